"""Plain multi-head softmax attention as a drop-in module: the baseline every mechanism is compared with.

Paper: "Attention Is All You Need" (Vaswani et al., 2017). The kernel is ``attnlab.attention``
(SDPA for dense and causal work), so this module costs what SDPA costs.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.patterns import causal as causal_pattern
from ..kernels import attention


def check_heads(d_model: int, n_heads: int) -> None:
    """Raise ValueError unless ``d_model`` is a positive multiple of ``n_heads``."""
    if n_heads < 1 or d_model < 1 or d_model % n_heads:
        raise ValueError(f"`d_model` must be a positive multiple of `n_heads`; got {d_model=}, {n_heads=}")


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """(B, N, H * D) -> (B, H, N, D)."""
    b, n, _ = x.shape
    return x.view(b, n, n_heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, N, D) -> (B, N, H * D)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(D)) v, bottom-right causal when ``causal``.

    q (B, H, Nq, D), k/v (B, H, Nk, D) -> (B, H, Nq, D).
    """
    return attention(q, k, v, pattern=causal_pattern() if causal else None)


class SoftmaxAttention(nn.Module):
    """Multi-head softmax attention with its own q/k/v/output projections (no bias).

    Shapes: x (B, N, d_model) -> (B, N, d_model); ``context`` (B, M, d_model) makes it cross
    attention (queries from x, keys and values from context; causal cross is bottom-right aligned).
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool = False) -> None:
        super().__init__()
        check_heads(d_model, n_heads)
        self.d_model, self.n_heads, self.causal = d_model, n_heads, causal
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        src = x if context is None else context
        q = split_heads(self.q_proj(x), self.n_heads)  # (B, H, N, D)
        k = split_heads(self.k_proj(src), self.n_heads)  # (B, H, M, D)
        v = split_heads(self.v_proj(src), self.n_heads)
        return self.o_proj(merge_heads(softmax_attention(q, k, v, causal=self.causal)))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}"


def main() -> None:
    """Toy run on CPU: shapes and that a causal module ignores the future."""
    torch.manual_seed(0)
    m = SoftmaxAttention(16, 4, causal=True)
    x = torch.randn(1, 6, 16)
    y = m(x)
    x2 = x.clone()
    x2[:, -1] += 1.0
    print(m, tuple(y.shape), "past unchanged:", torch.allclose(y[:, :-1], m(x2)[:, :-1]))


if __name__ == "__main__":
    main()
