"""Shared machinery of patterns over 1-D, 2-D and 3-D token grids (neighborhood, blocked).

Tokens are the cells of a grid ``shape`` in row-major order. A grid pattern is a product over axes:
query x may see key y iff, on every axis a, ``allowed_a(x_a, y_a)``. On each axis, ``dilation``
splits coordinates into interleaved groups (``x = g + dilation * c``); a query sees keys of its own
group only, inside a window ``lo(c) <= c_key <= hi(c)`` whose ends never decrease with c. Subclasses
give that window (``_window``); this file turns it into the mask_mod and an exact density (a
product of per-axis pair counts); ``grid_layout.py`` gives the exact block layout and ``tiling.py``
the token orders. No N x N evaluation happens.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch

from ._args import check_grid_lengths
from .base import Pattern
from .intervals import BIG

# A box's extent on one axis: (g, first, last), inclusive. g >= 0: group coordinates first..last of
# dilation group g; g == -1: raw coordinates first..last (every group). first > last: nothing.
Desc = Tuple[int, int, int]
Box = Tuple[Desc, ...]  # one Desc per axis


def minimum(x: torch.Tensor, y) -> torch.Tensor:
    return torch.clamp(x, max=y) if isinstance(y, int) else torch.minimum(x, y)


def maximum(x: torch.Tensor, y) -> torch.Tensor:
    return torch.clamp(x, min=y) if isinstance(y, int) else torch.maximum(x, y)


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

    def block_layout(self, n_q, n_kv, q_block=128, kv_block=128):
        from .grid_layout import layout_from_boxes
        from .tiling import row_major_blocks

        check_grid_lengths(self.shape, n_q, n_kv)
        q_boxes = row_major_blocks(self, q_block)
        k_boxes = q_boxes if kv_block == q_block else row_major_blocks(self, kv_block)
        return layout_from_boxes(self, q_boxes, k_boxes, q_block, kv_block)

    # ---- token permutation ---------------------------------------------------------------------
    def token_order(self, n_q, n_kv):
        """(N,) int64 CPU tile order (``tiling.tile_order``): dilation group, then tile, then row-major
        in a tile; None for 1-D grids without dilation, whose row-major runs are already tiles."""
        from .tiling import tile_order

        check_grid_lengths(self.shape, n_q, n_kv)
        if self.ndim == 1 and self.dilations == (1,):
            return None  # 1-D tiles are already contiguous runs
        return tile_order(self).clone()  # the cached copy stays intact whatever the caller does

    def permuted(self):
        from .permuted import Permuted

        return self if self.token_order(self.n_tokens, self.n_tokens) is None else Permuted(self)
