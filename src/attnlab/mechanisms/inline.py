"""InLine attention: injective linear attention plus a local attention residual.

Paper: "Bridging the Divide: Reconsidering Softmax and Linear Attention" (Han et al., NeurIPS 2024,
arXiv 2412.06590; paper 22).

Plain linear attention divides by ``sum_s phi(Q_i) . phi(K_s)``, which maps queries that differ
only in scale to the same weights (not injective). InLine subtracts the mean score instead::

    w_ij = c (Q_i . K_j  -  Q_i . mean_s K_s) + 1 / N        (sums to 1 over j, no division)
    out_i = sum_j w_ij V_j  =  c Q_i (K^T V) - c (Q_i . mean K) sum_j V_j + mean V

with ``phi`` = identity and ``c = scale / N`` (``scale`` = 1 / sqrt(D)), as in the authors' code.
The second ingredient, local modelling, is a residual ``sum_{j in window(i)} r_j V_j``: a
depthwise k x k convolution of V over the token grid (k x 1 over a sequence) whose taps ``r`` are
predicted per sample and channel by a small head-grouped MLP from the mean-pooled input tokens.

Causal form (attnlab's extension; the paper is non-causal vision): N and the means run over the
keys ``j <= i`` (so the weights still sum to 1), the residual window covers the k tokens ending at
i, and its taps are predicted from the running mean of the inputs up to i.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lightning import lightning_attention, running_sum
from .softmax import check_heads, merge_heads, split_heads


def inline_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None) -> Tensor:
    """The injective linear attention ``sum_j w_ij V_j`` (module docstring), in O(N D Dv).

    Args:
        q: (B, H, N, D). k: (B, H, M, D); M != N (cross attention) only when not causal.
        v: (B, H, M, Dv).
        causal: query i uses keys j <= i and N becomes i + 1.
        scale: score multiplier, default 1 / sqrt(D); the weights use ``scale / N``.

    Returns:
        (B, H, N, Dv) in q's dtype.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"`{name}` must be (B, H, N, D); got {name}.shape={tuple(t.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k, v must share (B, H), k and v N, q and k D; got {q.shape=}, {k.shape=}, {v.shape=}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal InLine attention is self-attention (Nq == Nk); got {q.shape[2]=}, {k.shape[2]=}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not scale > 0:
        raise ValueError(f"`scale` must be > 0; got {scale=}")
    if not causal:
        n = k.shape[2]
        k_mean, v_mean = k.mean(2, keepdim=True), v.mean(2, keepdim=True)  # (B, H, 1, D), (B, H, 1, Dv)
        centred = q @ (k.transpose(-1, -2) @ v) - (q * k_mean).sum(-1, keepdim=True) * v.sum(2, keepdim=True)
        return centred * (scale / n) + v_mean
    count = torch.arange(1, q.shape[2] + 1, device=q.device, dtype=q.dtype).view(-1, 1)  # (N, 1)
    k_mean = running_sum(k) / count  # (B, H, N, D): mean of keys j <= i
    v_sum = running_sum(v)
    scores_v = lightning_attention(q, k, v, causal=True)  # sum_{j <= i} (Q_i . K_j) V_j
    centred = scores_v - (q * k_mean).sum(-1, keepdim=True) * v_sum
    return centred * (scale / count) + v_sum / count


def local_residual(v: Tensor, taps: Tensor, grid: tuple[int, ...], *, causal: bool = False) -> Tensor:
    """Per-sample depthwise convolution of V over the token grid (zero padding at the borders).

    Args:
        v: (B, N, C) values, tokens in row-major order of ``grid`` (N = prod(grid)).
        taps: (B, C, k) for a 1-D grid or (B, C, k, k) for a 2-D one: one filter per sample and
            channel, centred on the token (odd k; even k has one more tap before it). Causal (1-D
            only): (B, N, C, k), one filter per position over the k tokens ending at it.
        grid: (N,) or (H, W).

    Returns:
        (B, N, C): ``sum_{j in window(i)} taps[., c, j - i] * v[j, c]``.
    """
    b, n, c = v.shape
    ks = taps.shape[-1]
    if causal:
        windows = F.pad(v, (0, 0, ks - 1, 0)).unfold(1, ks, 1)  # (B, N, C, k): tokens i-k+1 .. i
        return (windows * taps).sum(-1)
    flat = v.transpose(1, 2).reshape(1, b * c, *grid)
    pad = [ks // 2, (ks - 1) // 2] * len(grid)  # conv pads (last axis first); equal for odd k
    conv = F.conv1d if len(grid) == 1 else F.conv2d
    out = conv(F.pad(flat, pad), taps.reshape(b * c, 1, *taps.shape[2:]), groups=b * c)
    return out.reshape(b, c, n).transpose(1, 2)


class InLineAttention(nn.Module):
    """InLine attention layer: injective linear attention + predicted local residual, then W_o.

    Paper: "Bridging the Divide: Reconsidering Softmax and Linear Attention" (paper 22).
    Shapes: x (B, N, d_model) -> (B, N, d_model). Self-attention only: the local residual needs
    the queries' own grid, so ``context`` raises.

    Args:
        causal: attnlab's causal extension (1-D sequences only).
        grid: token grid (H, W) for image tokens in row-major order, or None for a 1-D sequence.
        kernel_size: residual window per axis (the paper's 3 x 3).
    """

    def __init__(
        self, d_model: int, n_heads: int, *, causal: bool = False, grid: tuple[int, int] | None = None,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        check_heads(d_model, n_heads)
        if grid is not None:
            grid = tuple(grid)
            if len(grid) != 2 or any(not isinstance(g, int) or g < 1 for g in grid):
                raise ValueError(f"`grid` must be None or (H, W) positive ints; got {grid=}")
            if causal:
                raise ValueError(f"causal InLine runs on 1-D sequences; got {causal=} with {grid=}")
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"`kernel_size` must be a positive int; got {kernel_size=}")
        self.d_model, self.n_heads, self.causal = d_model, n_heads, causal
        self.grid, self.kernel_size = grid, kernel_size
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        taps = kernel_size ** (1 if grid is None else 2)
        # The tap predictor: grouped 1x1 convs = one small MLP per head (the authors' design).
        self.residual = nn.Sequential(
            nn.Conv1d(d_model, d_model, 1, groups=n_heads),
            nn.GELU(),
            nn.Conv1d(d_model, d_model * taps, 1, groups=n_heads),
        )

    def _taps(self, pooled: Tensor) -> Tensor:
        """pooled (B, L, C) mean inputs -> (B, L, C, taps)."""
        b, l, c = pooled.shape
        out = self.residual(pooled.reshape(b * l, c, 1))  # (B*L, C*taps, 1)
        return out.view(b, l, c, -1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if context is not None:
            raise ValueError("InLineAttention is self-attention only (its local residual needs a grid); got `context`")
        b, n, c = x.shape
        grid = (n,) if self.grid is None else self.grid
        if math.prod(grid) != n:
            raise ValueError(f"`grid` must cover the tokens: prod(grid) == N; got {grid=}, N={n}")
        q, k, v = (split_heads(p(x), self.n_heads) for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, N, D)
        out = merge_heads(inline_attention(q, k, v, causal=self.causal))  # (B, N, C)
        v_tokens = merge_heads(v)
        if self.causal:
            running_mean = x.cumsum(1) / torch.arange(1, n + 1, device=x.device, dtype=x.dtype).view(-1, 1)
            res = local_residual(v_tokens, self._taps(running_mean), grid, causal=True)
        else:
            taps = self._taps(x.mean(1, keepdim=True))[:, 0]  # (B, C, taps)
            res = local_residual(v_tokens, taps.view(b, c, *[self.kernel_size] * len(grid)), grid)
        return self.o_proj(out + res)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}, grid={self.grid}, "
            f"kernel_size={self.kernel_size}"
        )


def main() -> None:
    """Toy run on CPU: InLine weights sum to one for every query, and a 4x4-grid layer's shapes."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 7, 4)
    ones = torch.ones(1, 1, 7, 1)
    print("weights sum to 1:", torch.allclose(inline_attention(q, k, ones), torch.ones(1, 1, 5, 1)))
    m = InLineAttention(16, 4, grid=(4, 4))
    print(m, tuple(m(torch.randn(2, 16, 16)).shape))


if __name__ == "__main__":
    main()
