"""HiLo attention: high-frequency heads attend inside local windows, low-frequency heads to pooled tokens.

Paper: "Fast Vision Transformers with HiLo Attention" (Pan et al., NeurIPS 2022, arXiv 2205.13213;
paper 24), the attention of LITv2.

The heads are split in two groups, ``alpha`` of them Lo-Fi and the rest Hi-Fi:

- Hi-Fi heads: softmax attention inside non-overlapping ``window`` x ``window`` windows of the
  token grid (``window`` tokens on a sequence): attnlab's ``blocked(grid, window)`` pattern.
- Lo-Fi heads: every query attends to the average of each window (keys and values come from the
  window-averaged input, which equals averaging projected keys and values), softmax over windows.

Each group has its own projections; the outputs are concatenated [Hi-Fi, Lo-Fi] along channels.
With ``window == 1`` every head is Lo-Fi (as in LITv2). Grids not divisible by ``window`` get short
last windows (both in Hi-Fi and in the Lo-Fi average, which then averages fewer tokens).

Causal form (attnlab's extension for sequences; the paper is non-causal vision): a Hi-Fi query
sees the keys of its window up to itself, a Lo-Fi query sees only windows that ended at or before
it (queries of the first window see no Lo-Fi key; their Lo-Fi output is 0).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.patterns import blocked, causal as causal_pattern
from ..kernels import attention
from .local_window import local_attention
from .softmax import merge_heads, split_heads


def window_pool(x: Tensor, grid: tuple[int, ...], window: int | tuple[int, ...]) -> Tensor:
    """Average of each non-overlapping window: (B, N, C) -> (B, M, C), M = prod(ceil(g / window)).

    Tokens are the cells of ``grid`` ((N,) or (H, W)) in row-major order; edge windows that the grid
    cuts short average the tokens they have.
    """
    b, n, c = x.shape
    cells = x.transpose(1, 2).reshape(b, c, *grid)
    pool = F.avg_pool1d if len(grid) == 1 else F.avg_pool2d
    pooled = pool(cells, window, window, ceil_mode=True)  # padding 0: edge windows divide by their size
    return pooled.reshape(b, c, -1).transpose(1, 2)


def hifi_attention(
    q: Tensor, k: Tensor, v: Tensor, *, grid: tuple[int, ...], window: int | tuple[int, ...], causal: bool = False
) -> Tensor:
    """Softmax attention inside non-overlapping windows (``window`` <= grid per axis).

    q, k (B, H, N, D), v (B, H, N, Dv) -> (B, H, N, Dv); causal keeps keys j <= i of the window.
    """
    pattern = blocked(grid, window)
    return local_attention(q, k, v, pattern & causal_pattern() if causal else pattern)


def lofi_attention(
    q: Tensor, k: Tensor, v: Tensor, *, grid: tuple[int, ...], window: int, causal: bool = False
) -> Tensor:
    """Every query attends to the M window averages. q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv).

    Causal (1-D grid): query i sees window w iff the window has ended, ``(w + 1) * window - 1 <= i``;
    queries that see no window get 0. Returns (B, H, N, Dv).
    """
    if not causal:
        return attention(q, k, v)  # dense softmax over windows: SDPA
    n, m = q.shape[2], k.shape[2]
    ends = (torch.arange(m, device=q.device) + 1) * window - 1  # (M,) last token of each window
    allowed = ends.view(1, -1) <= torch.arange(n, device=q.device).view(-1, 1)  # (N, M)
    seen = allowed.any(-1, keepdim=True)  # (N, 1)
    # Rows that see nothing get a harmless all-zero bias (no NaN from an empty softmax), then 0 out.
    bias = torch.zeros(n, m, dtype=q.dtype, device=q.device).masked_fill(~allowed & seen, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return out * seen.to(q.dtype)


class HiLoAttention(nn.Module):
    """HiLo attention layer (LITv2): Hi-Fi local-window heads + Lo-Fi pooled-key heads.

    Paper: "Fast Vision Transformers with HiLo Attention" (paper 24).
    Shapes: x (B, N, d_model) -> (B, N, d_model). Self-attention only (``context`` raises).

    Args:
        causal: attnlab's causal extension (1-D sequences only).
        alpha: share of heads that are Lo-Fi, in [0, 1] (LITv2 uses 0.9; ``int(alpha * H)`` heads).
        window: window side s (LITv2's default 2).
        grid: (H, W) of image tokens in row-major order, or None for a 1-D sequence.
    """

    def __init__(
        self, d_model: int, n_heads: int, *, causal: bool = False, alpha: float = 0.9, window: int = 2,
        grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if n_heads < 1 or d_model < 1 or d_model % n_heads:
            raise ValueError(f"`d_model` must be a positive multiple of `n_heads`; got {d_model=}, {n_heads=}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` (share of Lo-Fi heads) must be in [0, 1]; got {alpha=}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"`window` must be an integer >= 1; got {window=}")
        if grid is not None:
            grid = tuple(grid)
            if len(grid) != 2 or any(not isinstance(g, int) or g < 1 for g in grid):
                raise ValueError(f"`grid` must be None or (H, W) positive ints; got {grid=}")
            if causal:
                raise ValueError(f"causal HiLo runs on 1-D sequences; got {causal=} with {grid=}")
        head_dim = d_model // n_heads
        self.lo_heads = n_heads if window == 1 else int(n_heads * alpha)
        self.hi_heads = n_heads - self.lo_heads
        self.d_model, self.n_heads, self.causal, self.alpha, self.window, self.grid = (
            d_model, n_heads, causal, alpha, window, grid
        )
        hi_dim, lo_dim = self.hi_heads * head_dim, self.lo_heads * head_dim
        if self.hi_heads:
            self.h_qkv = nn.Linear(d_model, 3 * hi_dim, bias=False)
            self.h_proj = nn.Linear(hi_dim, hi_dim, bias=False)
        if self.lo_heads:
            self.l_q = nn.Linear(d_model, lo_dim, bias=False)
            self.l_kv = nn.Linear(d_model, 2 * lo_dim, bias=False)
            self.l_proj = nn.Linear(lo_dim, lo_dim, bias=False)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if context is not None:
            raise ValueError("HiLoAttention is self-attention only; got a `context` (cross attention)")
        n = x.shape[1]
        grid = (n,) if self.grid is None else self.grid
        if math.prod(grid) != n:
            raise ValueError(f"`grid` must cover the tokens: prod(grid) == N; got {grid=}, N={n}")
        window = tuple(min(self.window, g) for g in grid)  # a grid smaller than the window: one window
        parts = []
        if self.hi_heads:
            q, k, v = (split_heads(t, self.hi_heads) for t in self.h_qkv(x).chunk(3, -1))  # (B, Hh, N, D)
            o = hifi_attention(q, k, v, grid=grid, window=window, causal=self.causal)
            parts.append(self.h_proj(merge_heads(o)))
        if self.lo_heads:
            q = split_heads(self.l_q(x), self.lo_heads)  # (B, Hl, N, D)
            pooled = window_pool(x, grid, window)  # (B, M, d_model)
            k, v = (split_heads(t, self.lo_heads) for t in self.l_kv(pooled).chunk(2, -1))  # (B, Hl, M, D)
            o = lofi_attention(q, k, v, grid=grid, window=window[0], causal=self.causal)
            parts.append(self.l_proj(merge_heads(o)))
        return torch.cat(parts, -1)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads} (hi={self.hi_heads}, lo={self.lo_heads}), "
            f"causal={self.causal}, window={self.window}, grid={self.grid}"
        )


def main() -> None:
    """Toy run on CPU: a HiLo layer on a 4x6 grid, half the heads each way."""
    torch.manual_seed(0)
    m = HiLoAttention(16, 4, alpha=0.5, window=2, grid=(4, 6))
    print(m, tuple(m(torch.randn(2, 24, 16)).shape))


if __name__ == "__main__":
    main()
