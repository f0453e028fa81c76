"""Sigmoid attention without normalisation: each score passes through its own sigmoid, rows are not renormalised.

Paper: "When Attention Sink Emerges in Language Models: An Empirical View" (Gu et al., ICLR 2025,
arXiv 2410.10781; paper 47). Its ablation replaces softmax by ``A = sigmoid(Q K^T / sqrt(d)) ⊙ causal``
with no row renormalisation (sail-sg/Attention-Sink ``attention_normalize=False``) and finds no
attention sink up to 1B parameters: without a sum-to-one constraint a query that finds nothing
relevant can attend to nothing instead of dumping its mass on the first token.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.checks import check_qkv, default_scale
from ..core.patterns import causal as causal_pattern
from .softmax import check_heads, merge_heads, split_heads

CHUNK = 1024  # queries per block of weights: memory O(CHUNK * Nk) per head instead of O(Nq * Nk)


def sigmoid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    bias: float = 0.0,
    normalize: bool = False,
    scale: float | None = None,
) -> Tensor:
    """``(sigmoid(q k^T * scale + bias) ⊙ mask) v``; with ``normalize`` each row is divided by its sum.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D). v: (B, Hkv, Nk, Dv); Hq % Hkv == 0 (GQA).
        causal: bottom-right aligned causal mask (query i sees keys j <= i + Nk - Nq).
        bias: a scalar added to every score before the sigmoid (0 in paper 47; -log(Nk) is a common
            choice that starts the layer near softmax's total mass).
        normalize: divide each row by its sum (the paper's normalised ablation; False = the no-sink form).
        scale: multiplier of q k^T; default 1 / sqrt(D).

    Returns:
        (B, Hq, Nq, Dv). A row that may see no key is zeros.
    """
    check_qkv(q, k, v)
    scale = default_scale(q, scale)
    if not isinstance(bias, (int, float)):
        raise ValueError(f"`bias` must be a number; got {bias=}")
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    keep = causal_pattern().mask(q.shape[2], k.shape[2], device=q.device) if causal else None
    # Query chunks bound the (chunk, Nk) weight block held at once; rows are independent (no softmax).
    return torch.cat([
        _rows(q[:, :, s:s + CHUNK], k, v, None if keep is None else keep[s:s + CHUNK], scale, bias, normalize)
        for s in range(0, q.shape[2], CHUNK)
    ], dim=2)


def _rows(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, scale: float, bias: float, normalize: bool) -> Tensor:
    """One query chunk: q (B, H, C, D), k/v (B, H, Nk, D/Dv), keep (C, Nk) or None -> (B, H, C, Dv)."""
    a = torch.sigmoid(q @ k.transpose(-1, -2) * scale + bias)  # (B, H, C, Nk)
    if keep is not None:
        a = a * keep
    if normalize:
        a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    return a @ v


class SigmoidAttention(nn.Module):
    """Multi-head sigmoid attention (no row normalisation by default) with its own projections.

    Paper: "When Attention Sink Emerges in Language Models: An Empirical View" (paper 47).
    Shapes: x (B, N, d_model) -> (B, N, d_model); ``context`` (B, M, d_model) gives cross attention
    (elementwise sigmoid needs nothing from the other rows, so cross and causal cross are well defined).
    """

    def __init__(
        self, d_model: int, n_heads: int, *, causal: bool = False, bias: float = 0.0, normalize: bool = False
    ) -> None:
        super().__init__()
        check_heads(d_model, n_heads)
        if not isinstance(bias, (int, float)):
            raise ValueError(f"`bias` must be a number; got {bias=}")
        self.d_model, self.n_heads, self.causal = d_model, n_heads, causal
        self.bias, self.normalize = float(bias), bool(normalize)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        src = x if context is None else context
        q = split_heads(self.q_proj(x), self.n_heads)  # (B, H, N, D)
        k = split_heads(self.k_proj(src), self.n_heads)  # (B, H, M, D)
        v = split_heads(self.v_proj(src), self.n_heads)
        out = sigmoid_attention(q, k, v, causal=self.causal, bias=self.bias, normalize=self.normalize)
        return self.o_proj(merge_heads(out))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}, "
                f"bias={self.bias}, normalize={self.normalize}")


def main() -> None:
    """Toy run on CPU: the row sums of the sigmoid map are free (no sum-to-one), unlike softmax."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    eye = torch.eye(6).view(1, 1, 6, 6)  # v = identity exposes the attention map itself
    a = sigmoid_attention(q, k, eye, causal=True)
    print("row sums of causal sigmoid attention:", [round(float(s), 2) for s in a.sum(-1).flatten()])


if __name__ == "__main__":
    main()
