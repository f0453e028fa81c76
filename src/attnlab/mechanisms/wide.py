"""Wide attention: one layer of many heads, each head attending over the full embedding width.

Paper: "Wide Attention Is The Way Forward For Transformers?" (Brown, Zhao, Shumailov, Mullins;
arXiv 2210.00640; paper 39). It compares a single wide attention layer with deep stacks at the same
total number of heads and finds the wide model on par or better (+0.3% on average over 4 NLP tasks
and 10 attention types) with faster CPU inference (3.1x on byte-level IMDb at half the size).

The paper keeps the total number of heads fixed and moves them between layers, widening a layer
"by fixing the attention computation size" of each head. So in a wide layer the heads are not
slices of d_model: every head projects x to its own ``head_dim`` (attnlab's default: d_model; the
paper's exact head size is not restated here) and the concatenated heads (H * head_dim) are
projected back to d_model, so adding heads widens the layer instead of thinning each head.
``wide_vs_deep`` lays out the paper's comparison as model configurations.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .softmax import merge_heads, softmax_attention, split_heads


def wide_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False) -> Tensor:
    """Per-head ``softmax(q k^T / sqrt(head_dim)) v`` over wide heads (the heads' math is plain softmax).

    q (B, H, Nq, D), k/v (B, H, Nk, D) with D = head_dim (d_model by default) -> (B, H, Nq, D).
    """
    return softmax_attention(q, k, v, causal=causal)


def wide_vs_deep(total_heads: int, depths: tuple[int, ...] = (1, 2, 4)) -> list[dict]:
    """Model configurations for the paper's comparison: ``total_heads`` spread over each depth.

    Returns one dict per depth L, ``{"mechanism": "wide", "n_layers": L, "n_heads": total_heads // L}``,
    ready for ``attnlab.models.TinyTransformer(**cfg, d_model=..., causal=...)``. Depth 1 is the
    paper's wide model; the others are the deep baselines with the same number of heads in total.
    """
    if not isinstance(total_heads, int) or total_heads < 1:
        raise ValueError(f"`total_heads` must be a positive integer; got {total_heads=}")
    bad = [d for d in depths if not isinstance(d, int) or d < 1 or total_heads % d]
    if not depths or bad:
        raise ValueError(f"`depths` must be positive divisors of total_heads; got {depths=}, {total_heads=}")
    return [{"mechanism": "wide", "n_layers": d, "n_heads": total_heads // d} for d in depths]


class WideAttention(nn.Module):
    """A wide multi-head attention layer: ``n_heads`` heads of ``head_dim`` each (default d_model).

    Paper: "Wide Attention Is The Way Forward For Transformers?" (paper 39).
    Shapes: x (B, N, d_model) -> (B, N, d_model); ``context`` (B, M, d_model) gives cross attention.
    Parameters: 3 * d_model * H * head_dim (q, k, v) + H * head_dim * d_model (output).
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool = False, head_dim: int | None = None) -> None:
        super().__init__()
        head_dim = d_model if head_dim is None else head_dim
        for name, val in (("d_model", d_model), ("n_heads", n_heads), ("head_dim", head_dim)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {name}={val!r}")
        self.d_model, self.n_heads, self.head_dim, self.causal = d_model, n_heads, head_dim, causal
        width = n_heads * head_dim
        self.q_proj = nn.Linear(d_model, width, bias=False)
        self.k_proj = nn.Linear(d_model, width, bias=False)
        self.v_proj = nn.Linear(d_model, width, bias=False)
        self.o_proj = nn.Linear(width, d_model, bias=False)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        src = x if context is None else context
        q = split_heads(self.q_proj(x), self.n_heads)  # (B, H, N, head_dim)
        k = split_heads(self.k_proj(src), self.n_heads)  # (B, H, M, head_dim)
        v = split_heads(self.v_proj(src), self.n_heads)
        return self.o_proj(merge_heads(wide_attention(q, k, v, causal=self.causal)))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}, causal={self.causal}"


def main() -> None:
    """Toy run on CPU: parameter counts of the wide layer vs the deep stacks of the same total heads."""
    for cfg in wide_vs_deep(8, (1, 2, 4, 8)):
        layer = WideAttention(32, cfg["n_heads"])
        n = sum(p.numel() for p in layer.parameters()) * cfg["n_layers"]
        print(cfg, f"attention parameters: {n}", tuple(layer(torch.randn(1, 5, 32)).shape))


if __name__ == "__main__":
    main()
