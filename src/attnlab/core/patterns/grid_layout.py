"""Exact block layouts of grid patterns, from the boxes that kernel blocks cover.

A kernel tile holds a run of consecutive token positions, which is a union of a few boxes of the
grid (``tiling.py``). Because a grid rule is a product over axes, a pair of boxes is touched iff it
is touched on every axis and full iff full on every axis; per axis that is a look-up in the
monotone window tables (``intervals.window_tiles``) for each pair of distinct per-axis extents
(few). Tiles whose blocks hold several boxes are first pruned with the blocks' per-axis hulls.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List

import torch

from .base import BlockLayout
from .intervals import BIG, window_tiles

if TYPE_CHECKING:
    from .grid import Box, Desc, GridPattern

EMPTY = (0, 0, -1)  # the Desc of no coordinates


class _BoxSet:
    """The boxes of a list of kernel blocks, indexed per axis by distinct descriptor.

    ``members`` (n_blocks, max boxes): 1-based box numbers of each block, 0 = padding. Per axis,
    ``index[axis]`` (1 + n_boxes,) maps a box number to a row of ``descs[axis]`` (U, G, 2); row 0
    is the empty descriptor, so padding is never touched and vacuously full.
    """

    def __init__(self, p: "GridPattern", blocks: List[List["Box"]]):
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
            seen: Dict["Desc", int] = {EMPTY: 0}
            self.index.append(torch.tensor([0] + [seen.setdefault(b[axis], len(seen)) for bs in blocks for b in bs]))
            self.descs.append(expand(p, axis, list(seen)))

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


def expand(p: "GridPattern", axis: int, descs: List["Desc"]) -> torch.Tensor:
    """(U, dilation, 2) int64: each descriptor as one inclusive c-interval per group, (0, -1) if none."""
    d = p.dilations[axis]
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


def axis_tiles(p: "GridPattern", axis: int, qd: torch.Tensor, kd: torch.Tensor):
    """touched, full: bool (Uq, Uk) for expanded descriptors qd (Uq, G, 2) and kd (Uk, G, 2)."""
    lo, hi = p._tables(axis)
    d = p.dilations[axis]
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


def layout_from_boxes(p: "GridPattern", q_boxes: List[List["Box"]], k_boxes: List[List["Box"]], q_block, kv_block):
    """Exact BlockLayout of p from the boxes of each query block and each key block.

    Stage 1 keeps the tiles whose blocks' per-axis hulls touch (a superset of the touched
    tiles, at one test per tile); stage 2 tests every box pair of those tiles exactly.
    """
    q, k = _BoxSet(p, q_boxes), _BoxSet(p, k_boxes)
    if q.members.shape[1] == 1 and k.members.shape[1] == 1:
        return layout_one_box_per_block(p, q, k, q_block, kv_block)
    candidate = None
    for axis in range(p.ndim):
        (qh, q_inv), (kh, k_inv) = q.hulls(axis), k.hulls(axis)
        t = _lookup(axis_tiles(p, axis, qh, kh)[0], q_inv[:, None], k_inv[None, :])
        candidate = t if candidate is None else candidate & t
    ti, tj = candidate.nonzero(as_tuple=True)
    qs, ks = q.members[ti][:, :, None], k.members[tj][:, None, :]  # (C, Mq, 1), (C, 1, Mk)
    touched_pairs = full_pairs = None
    for axis in range(p.ndim):
        t, f = axis_tiles(p, axis, q.descs[axis], k.descs[axis])
        flat = q.index[axis][qs] * t.shape[1] + k.index[axis][ks]
        t, f = t.view(-1)[flat], f.view(-1)[flat]  # (C, Mq, Mk)
        touched_pairs = t if touched_pairs is None else touched_pairs & t
        full_pairs = f if full_pairs is None else full_pairs & f
    is_touched = touched_pairs.flatten(1).any(1)
    is_full = full_pairs.flatten(1).all(1) & is_touched
    touched = torch.zeros(len(q_boxes), len(k_boxes), dtype=torch.bool)
    full = torch.zeros_like(touched)
    touched[ti[is_touched], tj[is_touched]] = True
    full[ti[is_full], tj[is_full]] = True
    return BlockLayout(full, touched & ~full, q_block, kv_block)


def layout_one_box_per_block(p: "GridPattern", q: "_BoxSet", k: "_BoxSet", q_block, kv_block):
    """Every block is one box (aligned tiles, 1-D runs): one table lookup per tile and axis."""
    touched = full = None
    for axis in range(p.ndim):
        t, f = axis_tiles(p, axis, q.descs[axis], k.descs[axis])
        flat = q.index[axis][q.members[:, 0]][:, None] * t.shape[1] + k.index[axis][k.members[:, 0]][None, :]
        t, f = t.view(-1)[flat], f.view(-1)[flat]
        touched = t if touched is None else touched & t
        full = f if full is None else full & f
    full = full & touched
    return BlockLayout(full, touched & ~full, q_block, kv_block)
