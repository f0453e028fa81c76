"""Attention-map thumbnails: each head's map mean-pooled to (S, S), built while streaming.

For pictures in reports (as in "How Does Attention Work in Vision Transformers? A Visual Analytics
Attempt", Li et al., arXiv 2303.13731, which shows per-head attention patterns). Query i falls in
row bin i * S // N and key j in column bin j * S // N (N = number of keys of the call); each
thumbnail cell is the mean probability over its block, averaged over samples. Masked (future or
padded) entries count as 0. When a chunk holds whole row bins its rows are summed per bin first (one
pass, reused by the column-mass observers), then keys per bin; otherwise keys are pooled per row
(by reshape, or from row prefix sums when N is not divisible by S) and rows with an index_add. State: O(L * H * S * S); only a fresh prefill (first query at position 0) is pooled,
later calls of the same layer (decode steps) and prefills of another length are ignored.
"""
from __future__ import annotations

import math

import torch

from ..probes.base import CallContext, Observer
from ..probes.prefix import mass_before, row_cumsum, row_group_sums
from ..probes.visibility import chunk_positions, key_limit, query_valid

SIZE = 64


def bin_edges(n: int, size: int) -> torch.Tensor:
    """(size + 1,) long: bin b covers indices [edges[b], edges[b+1]), i.e. those with i * size // n == b."""
    return torch.tensor([math.ceil(b * n / size) for b in range(size + 1)], dtype=torch.long)


def _key_bin_sums(p: torch.Tensor, n_kv: int, s: int) -> torch.Tensor:
    """(H, R, S) sums over samples and over each key bin of p (B, H, R, W <= n_kv; later keys are 0).

    Equal bins (n_kv divisible by S) are one reshape + sum; otherwise bin sums are differences of the
    row prefix sum.
    """
    b, h, c, lim = p.shape
    if n_kv % s == 0:
        width = n_kv // s
        full = lim // width
        out = p.new_zeros(h, c, s)
        if full:
            out[..., :full] = p[..., : full * width].reshape(b, h, c, full, width).sum(dim=(0, 4))
        if lim > full * width:
            out[..., full] = p[..., full * width :].sum(dim=(0, 3))
        return out
    e = bin_edges(n_kv, s).clamp(max=lim)[None, :].expand(c, -1)
    before = mass_before(row_cumsum(p), e)  # (B, H, C, S + 1)
    return (before[..., 1:] - before[..., :-1]).sum(0)


def _aligned_row_bins(pos: torch.Tensor, n_kv: int, s: int) -> int:
    """G when the chunk's rows (positions ``pos``) are exactly G whole, equal row bins, else 0."""
    if n_kv % s:
        return 0
    width, c, p0 = n_kv // s, pos.numel(), int(pos[0])
    if p0 % width or c % width or not bool((pos == torch.arange(p0, p0 + c)).all()):
        return 0
    return c // width


class ThumbnailObserver(Observer):
    """Pooled (S, S) maps of every head; ``result(heads)`` returns the chosen ones."""

    def __init__(self, size: int = SIZE) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"`size` must be an int >= 1; got {size=}")
        self.size = size
        self.reset()

    def reset(self) -> None:
        self._sum: dict[int, torch.Tensor] = {}  # layer -> (H, S, S) f64 sums
        self._rows: dict[int, torch.Tensor] = {}  # layer -> (S,) real query rows pooled per bin
        self._n: dict[int, int] = {}
        self._active: dict[int, bool] = {}
        self.n_layers: int | None = None

    narrow_ok = True

    def observe(self, ctx: CallContext, q_start: int, probs: torch.Tensor) -> None:
        b, h, c, _ = probs.shape
        n_kv = ctx.n_kv
        self.n_layers = ctx.n_layers
        pos = chunk_positions(ctx, q_start, c)
        if q_start == 0:
            fresh = int(ctx.q_positions[0]) == 0
            if fresh and ctx.layer not in self._n:
                s = min(self.size, n_kv)
                self._n[ctx.layer] = n_kv
                self._sum[ctx.layer] = torch.zeros(h, s, s, dtype=torch.float64)
                self._rows[ctx.layer] = torch.zeros(s, dtype=torch.float64)
            # further prefills of the same length accumulate (more samples); other calls are skipped
            self._active[ctx.layer] = fresh and self._n.get(ctx.layer) == n_kv
        if not self._active.get(ctx.layer):
            return
        s = self._sum[ctx.layer].shape[-1]
        real = query_valid(ctx, q_start, c, b)
        lim = min(key_limit(ctx, q_start, c), probs.shape[-1])
        p = probs.detach().float()[..., :lim]  # keys beyond hold no mass
        if ctx.key_padding is not None:  # padded rows may hold anything, even NaN
            p = p.masked_fill(~real[:, None, :, None].to(p.device), 0.0)
        rbin = pos * s // n_kv
        self._rows[ctx.layer].index_add_(0, rbin, real.double().sum(0))
        groups = _aligned_row_bins(pos, n_kv, s)
        if groups:  # whole row bins: pool rows first (one pass, shared with column sums), then keys
            sums = _key_bin_sums(row_group_sums(p, groups), n_kv, s)  # (H, G, S)
            self._sum[ctx.layer][:, int(rbin[0]) : int(rbin[0]) + groups] += sums.cpu()
            return
        self._sum[ctx.layer].index_add_(1, rbin, _key_bin_sums(p, n_kv, s).cpu().double())  # (H, C, S) per row

    def maps(self, layer: int) -> torch.Tensor:
        """(H, S, S) float64 pooled means of ``layer``."""
        n, total, rows = self._n[layer], self._sum[layer], self._rows[layer]
        e = bin_edges(n, total.shape[-1])
        width = (e[1:] - e[:-1]).double()
        return total / (rows[:, None] * width[None, :]).clamp_min(1)[None]

    def result(self, heads: list[tuple[int, int]] | None = None) -> dict:
        """``{"size", "n_keys", "heads": [[layer, head]], "maps": [k][S][S]}`` for ``heads`` (None: all)."""
        if heads is None:
            heads = [(l, h) for l in sorted(self._sum) for h in range(self._sum[l].shape[0])]
        maps = []
        for l, h in heads:
            if l not in self._sum or not 0 <= h < self._sum[l].shape[0]:
                raise ValueError(f"no thumbnail for (layer, head)=({l}, {h}); layers seen: {sorted(self._sum)}")
            maps.append(self.maps(l)[h].tolist())
        n = next(iter(self._n.values()), 0)
        return {"size": min(self.size, n) if n else self.size, "n_keys": n, "heads": [list(x) for x in heads], "maps": maps}


def pooled_map(a: torch.Tensor, size: int = SIZE, key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: (H, S, S) block means of full maps a (B, H, N, N), averaged over real query rows and samples."""
    b, h, n, _ = a.shape
    s = min(size, n)
    a = a.double()
    if key_padding is not None:  # padded rows may hold anything
        a = torch.where(key_padding.bool()[:, None, :, None], a, 0.0)
    qb = torch.arange(n) * s // n
    out = torch.zeros(h, s, s, dtype=torch.float64)
    for i in range(s):
        for j in range(s):
            rows, cols = qb == i, qb == j
            n_rows = rows.sum() * b if key_padding is None else key_padding.bool()[:, rows].sum()
            out[:, i, j] = a[:, :, rows][..., cols].sum((0, 2, 3)) / max(int(n_rows) * int(cols.sum()), 1)
    return out
