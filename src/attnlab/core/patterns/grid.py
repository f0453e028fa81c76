"""Shared machinery of patterns over 1-D, 2-D and 3-D token grids (neighborhood, blocked).

Tokens are the cells of a grid ``shape`` in row-major order. A grid pattern is a product over axes:
query x may see key y iff, on every axis a, ``allowed_a(x_a, y_a)``. On each axis, ``dilation``
splits coordinates into interleaved groups (``x = g + dilation * c``); a query sees keys of its own
group only, inside a window ``lo(c) <= c_key <= hi(c)`` whose ends never decrease with c. Subclasses
give that window (``_window``); this file turns it into the mask_mod, an exact density (a product
of per-axis pair counts) and an exact block layout computed per axis on intervals:

a kernel tile holds a run of consecutive token positions, which is a union of a few boxes of the
grid (``tiling.py``). Because the rule is a product over axes, a pair of boxes is touched iff it is
touched on every axis and full iff full on every axis, and per axis that is two binary searches on
the monotone window table (``intervals.window_tiles``). No N x N evaluation happens.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch

from ._args import check_grid_lengths
from .base import BlockLayout, Pattern
from .intervals import BIG, window_tiles

# A box's extent on one axis: (g, first, last), inclusive. g >= 0: group coordinates first..last of
# dilation group g; g == -1: raw coordinates first..last (every group). first > last: nothing.
Desc = Tuple[int, int, int]
Box = Tuple[Desc, ...]  # one Desc per axis
EMPTY: Desc = (0, 0, -1)


def minimum(x: torch.Tensor, y) -> torch.Tensor:
    return torch.clamp(x, max=y) if isinstance(y, int) else torch.minimum(x, y)


def maximum(x: torch.Tensor, y) -> torch.Tensor:
    return torch.clamp(x, min=y) if isinstance(y, int) else torch.maximum(x, y)


class _BoxSet:
    """The boxes of a list of kernel blocks, indexed per axis by distinct descriptor.

    ``members`` (n_blocks, max boxes): 1-based box numbers of each block, 0 = padding. Per axis,
    ``index[axis]`` (1 + n_boxes,) maps a box number to a row of ``descs[axis]`` (U, G, 2); row 0
    is the empty descriptor, so padding is never touched and vacuously full.
    """

    def __init__(self, p: "GridPattern", blocks: List[List[Box]]):
        width = max(map(len, blocks))
        rows, owner, n = [], [], 1
        for i, bs in enumerate(blocks):
            rows.append(list(range(n, n + len(bs))) + [0] * (width - len(bs)))
            owner += [i] * len(bs)
            n += len(bs)
        self.members = torch.tensor(rows, dtype=torch.long)
        self.owner = torch.tensor(owner, dtype=torch.long)
        self.n_blocks = len(blocks)
        self.index, self.descs = [], []
        for axis in range(p.ndim):
            seen: Dict[Desc, int] = {EMPTY: 0}
            self.index.append(torch.tensor([0] + [seen.setdefault(b[axis], len(seen)) for bs in blocks for b in bs]))
            self.descs.append(p._expand(axis, list(seen)))

    def hulls(self, axis: int):
        """Per block, the smallest per-group intervals holding all its boxes: distinct (U, G, 2) and (n_blocks,) index."""
        per_box = self.descs[axis][self.index[axis][1:]]  # (n_boxes, G, 2)
        present = per_box[..., 0] <= per_box[..., 1]
        lo = torch.where(present, per_box[..., 0], BIG)
        hi = torch.where(present, per_box[..., 1], -1)
        g = lo.shape[1]
        owner = self.owner[:, None].expand(-1, g)
        h_lo = torch.full((self.n_blocks, g), BIG, dtype=torch.long).scatter_reduce(0, owner, lo, "amin")
        h_hi = torch.full((self.n_blocks, g), -1, dtype=torch.long).scatter_reduce(0, owner, hi, "amax")
        empty = h_lo > h_hi
        hull = torch.stack([h_lo.masked_fill(empty, 0), h_hi.masked_fill(empty, -1)], -1)
        seen: Dict[tuple, int] = {}
        inverse = torch.tensor([seen.setdefault(tuple(row), len(seen)) for row in hull.flatten(1).tolist()])
        return torch.tensor(list(seen), dtype=torch.long).view(-1, g, 2), inverse


def _lookup(table: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """table[rows, cols] for broadcastable index tensors, through one flat gather (faster)."""
    return table.view(-1)[rows * table.shape[1] + cols]


def unravel(idx: torch.Tensor, shape: Tuple[int, ...]) -> List[torch.Tensor]:
    """Row-major flat index -> one coordinate tensor per axis."""
    coords = []
    for size in reversed(shape[1:]):
        coords.append(idx % size)
        idx = idx // size
    coords.append(idx)
    return coords[::-1]


class GridPattern(Pattern):
    """Base of grid patterns. Subclasses are frozen dataclasses with fields ``shape`` and
    ``tile_shape`` (None: the default tile), may have ``dilation``, and implement ``_window``."""

    shape: Tuple[int, ...]
    tile_shape: Tuple[int, ...] | None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dilations(self) -> Tuple[int, ...]:
        return getattr(self, "dilation", (1,) * self.ndim)

    @property
    def n_tokens(self) -> int:
        return math.prod(self.shape)

    def group_length(self, axis: int, g: int) -> int:
        """Coordinates on ``axis`` in dilation group g."""
        size, d = self.shape[axis], self.dilations[axis]
        return size // d + (g < size % d)

    def _window(self, axis: int, c: torch.Tensor, n) -> Tuple[torch.Tensor, torch.Tensor]:
        """Window (lo, hi), inclusive, in group coordinates, of queries c in a group of length n.

        ``n`` is an int or a tensor broadcastable with c; torch ops only (this runs in mask_mod).
        """
        raise NotImplementedError

    # ---- the rule ----------------------------------------------------------------------------
    def _axis_allowed(self, axis: int, xq: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
        d, size = self.dilations[axis], self.shape[axis]
        if d == 1:
            lo, hi = self._window(axis, xq, size)
            return (lo <= xk) & (xk <= hi)
        gq, cq, gk, ck = xq % d, xq // d, xk % d, xk // d
        n = (gq < size % d).to(xq.dtype) + size // d
        lo, hi = self._window(axis, cq, n)
        return (gq == gk) & (lo <= ck) & (ck <= hi)

    def mask_mod(self, n_q, n_kv, device=None):
        check_grid_lengths(self.shape, n_q, n_kv)

        def mod(b, h, q, k):
            cq, ck = unravel(q, self.shape), unravel(k, self.shape)
            out = self._axis_allowed(0, cq[0], ck[0])
            for axis in range(1, self.ndim):
                out = out & self._axis_allowed(axis, cq[axis], ck[axis])
            return out

        return mod

    # ---- exact geometry from per-axis window tables -------------------------------------------
    def _tables(self, axis: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi): (dilation, L_group_max) int64 windows per group, padded with BIG."""
        d = self.dilations[axis]
        longest = self.group_length(axis, 0)
        lo = torch.full((d, longest), BIG, dtype=torch.long)
        hi = torch.full((d, longest), BIG, dtype=torch.long)
        for g in range(d):
            n = self.group_length(axis, g)
            s, e = self._window(axis, torch.arange(n), n)
            lo[g, :n], hi[g, :n] = s.clamp(min=0), e.clamp(max=n - 1)
        return lo, hi

    def density(self, n_q, n_kv):
        check_grid_lengths(self.shape, n_q, n_kv)
        pairs = 1
        for axis in range(self.ndim):
            lo, hi = self._tables(axis)
            valid = lo < BIG
            pairs *= int(((hi - lo + 1) * valid).sum())
        return pairs / (n_q * n_kv)

    def _expand(self, axis: int, descs: List[Desc]) -> torch.Tensor:
        """(U, dilation, 2) int64: each descriptor as one inclusive c-interval per group, (0, -1) if none."""
        d = self.dilations[axis]
        rows = []
        for g, first, last in descs:
            row = [(0, -1)] * d
            if first <= last and g >= 0:
                row[g] = (first, last)
            elif first <= last:
                for gg in range(d):
                    lo, hi = -(-(first - gg) // d), (last - gg) // d
                    if lo <= hi:
                        row[gg] = (lo, hi)
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long).view(len(descs), d, 2)

    def _axis_tiles(self, axis: int, qd: torch.Tensor, kd: torch.Tensor):
        """touched, full: bool (Uq, Uk) for expanded descriptors qd (Uq, G, 2) and kd (Uk, G, 2)."""
        lo, hi = self._tables(axis)
        d = self.dilations[axis]
        qd, kd = qd.permute(1, 0, 2), kd.permute(1, 0, 2)  # (G, U, 2)
        q_ok, k_ok = qd[..., 0] <= qd[..., 1], kd[..., 0] <= kd[..., 1]  # group present
        qf, ql = qd[..., 0].clamp(min=0), qd[..., 1].clamp(min=0)
        kf, kl = kd[..., 0].clamp(min=0), kd[..., 1].clamp(min=0)
        n_q_groups, n_k_groups = q_ok.sum(0), k_ok.sum(0)
        touched = torch.zeros(qd.shape[1], kd.shape[1], dtype=torch.bool)
        full = (n_q_groups == 0)[:, None] | (n_k_groups == 0)[None, :]  # padding: vacuously full
        if d == 1:
            t, f = window_tiles(lo, hi, qf[:, :, None], ql[:, :, None], kf[:, None, :], kl[:, None, :], lo.shape[1])
            both = q_ok[0][:, None] & k_ok[0][None, :]
            return touched | (t[0] & both), full | (f[0] & both)
        # Many groups: first drop pairs whose raw extents cannot meet (the keys any query of the
        # descriptor may reach, over all its groups), then test the rest group by group.
        g = torch.arange(d)[:, None]
        reach_first = torch.where(q_ok, g + d * lo.gather(1, qf), BIG).amin(0)  # (Uq,) raw
        reach_last = torch.where(q_ok, g + d * hi.gather(1, ql), -1).amax(0)
        key_first = torch.where(k_ok, g + d * kf, BIG).amin(0)  # (Uk,) raw
        key_last = torch.where(k_ok, g + d * kl, -1).amax(0)
        # A descriptor of a single group (tile order) only meets that group; -1: several groups.
        q_group = torch.where(n_q_groups == 1, q_ok.int().argmax(0), -1)
        k_group = torch.where(n_k_groups == 1, k_ok.int().argmax(0), -1)
        same_group = (q_group[:, None] == k_group[None, :]) | (q_group[:, None] < 0) | (k_group[None, :] < 0)
        meet = (reach_first[:, None] <= key_last[None, :]) & (key_first[None, :] <= reach_last[:, None])
        iq, ik = (meet & same_group).nonzero(as_tuple=True)
        t, f = window_tiles(lo, hi, qf[:, iq], ql[:, iq], kf[:, ik], kl[:, ik], lo.shape[1])  # (G, C)
        both = q_ok[:, iq] & k_ok[:, ik]
        touched[iq, ik] = (t & both).any(0)
        # Full needs every pair in one group: each side holds a single group, the same one.
        single = (n_q_groups[iq] == 1) & (n_k_groups[ik] == 1)
        full[iq, ik] |= (f & both).any(0) & single
        return touched, full

    def _layout_from_boxes(self, q_boxes: List[List[Box]], k_boxes: List[List[Box]], q_block, kv_block):
        """Exact BlockLayout from the boxes of each query block and each key block.

        Stage 1 keeps the tiles whose blocks' per-axis hulls touch (a superset of the touched
        tiles, at one test per tile); stage 2 tests every box pair of those tiles exactly.
        """
        q, k = _BoxSet(self, q_boxes), _BoxSet(self, k_boxes)
        if q.members.shape[1] == 1 and k.members.shape[1] == 1:
            return self._layout_one_box_per_block(q, k, q_block, kv_block)
        candidate = None
        for axis in range(self.ndim):
            (qh, q_inv), (kh, k_inv) = q.hulls(axis), k.hulls(axis)
            t = _lookup(self._axis_tiles(axis, qh, kh)[0], q_inv[:, None], k_inv[None, :])
            candidate = t if candidate is None else candidate & t
        ti, tj = candidate.nonzero(as_tuple=True)
        qs, ks = q.members[ti][:, :, None], k.members[tj][:, None, :]  # (C, Mq, 1), (C, 1, Mk)
        touched_pairs = full_pairs = None
        for axis in range(self.ndim):
            t, f = self._axis_tiles(axis, q.descs[axis], k.descs[axis])
            flat = q.index[axis][qs] * t.shape[1] + k.index[axis][ks]
            t, f = t.view(-1)[flat], f.view(-1)[flat]
            touched_pairs = t if touched_pairs is None else touched_pairs & t
            full_pairs = f if full_pairs is None else full_pairs & f
        is_touched = touched_pairs.flatten(1).any(1)
        is_full = full_pairs.flatten(1).all(1) & is_touched
        touched = torch.zeros(len(q_boxes), len(k_boxes), dtype=torch.bool)
        full = torch.zeros_like(touched)
        touched[ti[is_touched], tj[is_touched]] = True
        full[ti[is_full], tj[is_full]] = True
        return BlockLayout(full, touched & ~full, q_block, kv_block)

    def _layout_one_box_per_block(self, q: "_BoxSet", k: "_BoxSet", q_block, kv_block):
        """Every block is one box (aligned tiles, 1-D runs): one table lookup per tile and axis."""
        touched = full = None
        for axis in range(self.ndim):
            t, f = self._axis_tiles(axis, q.descs[axis], k.descs[axis])
            flat = q.index[axis][q.members[:, 0]][:, None] * t.shape[1] + k.index[axis][k.members[:, 0]][None, :]
            t, f = t.view(-1)[flat], f.view(-1)[flat]
            touched = t if touched is None else touched & t
            full = f if full is None else full & f
        full = full & touched
        return BlockLayout(full, touched & ~full, q_block, kv_block)

    def block_layout(self, n_q, n_kv, q_block=128, kv_block=128):
        from .tiling import row_major_blocks

        check_grid_lengths(self.shape, n_q, n_kv)
        q_boxes = row_major_blocks(self, q_block)
        k_boxes = q_boxes if kv_block == q_block else row_major_blocks(self, kv_block)
        return self._layout_from_boxes(q_boxes, k_boxes, q_block, kv_block)

    # ---- token permutation ---------------------------------------------------------------------
    def token_order(self, n_q, n_kv):
        """Tile order (see ``tiling.tile_order``): dilation group, then tile, then row-major in a tile."""
        from .tiling import tile_order

        check_grid_lengths(self.shape, n_q, n_kv)
        if self.ndim == 1 and self.dilations == (1,):
            return None  # 1-D tiles are already contiguous runs
        return tile_order(self)

    def permuted(self):
        from .permuted import Permuted

        return self if self.token_order(self.n_tokens, self.n_tokens) is None else Permuted(self)
