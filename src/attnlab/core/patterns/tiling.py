"""Token orders of a grid and the boxes that a run of consecutive positions covers.

Row-major order of an n-D grid puts a 2-D neighborhood's keys in many short runs, so a kernel's
128-token blocks are mostly partial. The tile order of "Generalized Neighborhood Attention:
Multi-dimensional Sparse Attention at the Speed of Light" (GNA; NATTEN's token permutation) lays the
tokens out tile by tile instead: first by dilation group (row-major over the groups), then by tile
of ``tile_shape`` within the group's grid (row-major over tiles), then row-major inside the tile.
With a tile volume equal to the kernel block (128 by default: 128, 8x16 or 4x4x8) and a grid
divisible by the tile, every kernel block is one box of the grid, and block density approaches
element density. Edge tiles of non-divisible grids are smaller; the order stays a permutation.
"""
from __future__ import annotations

import bisect
import functools
import itertools
import math
from typing import List, Tuple

import torch

from .grid import Box, Desc, GridPattern, unravel

DEFAULT_TILES = {1: (128,), 2: (8, 16), 3: (4, 4, 8)}
TILE_VOLUME = 128


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_tile_shape(group_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """DEFAULT_TILES clipped to the grid, then grown (last axes first) back towards TILE_VOLUME."""
    tile = [min(t, n) for t, n in zip(DEFAULT_TILES[len(group_shape)], group_shape)]
    for axis in reversed(range(len(tile))):
        others = math.prod(tile) // tile[axis]
        tile[axis] = max(tile[axis], min(group_shape[axis], cdiv(TILE_VOLUME, others)))
    return tuple(tile)


def resolved_tile(p: GridPattern) -> Tuple[int, ...]:
    group_shape = tuple(cdiv(s, d) for s, d in zip(p.shape, p.dilations))
    return p.tile_shape if p.tile_shape is not None else default_tile_shape(group_shape)


@functools.lru_cache(maxsize=64)
def tile_order(p: GridPattern) -> torch.Tensor:
    """(N,) int64: ``order[pos]`` is the row-major index of the token placed at ``pos``."""
    tile = resolved_tile(p)
    coords = unravel(torch.arange(p.n_tokens), p.shape)
    key = torch.zeros(p.n_tokens, dtype=torch.long)
    parts = []  # (digit, radix), most significant first
    for x, d in zip(coords, p.dilations):
        parts.append((x % d, d))
    for x, d, s, t in zip(coords, p.dilations, p.shape, tile):
        parts.append(((x // d) // t, cdiv(cdiv(s, d), t)))
    for x, d, t in zip(coords, p.dilations, tile):
        parts.append(((x // d) % t, t))
    for digit, radix in parts:
        key = key * radix + digit
    return torch.argsort(key, stable=True)


@functools.lru_cache(maxsize=64)
def _cells(p: GridPattern) -> Tuple[List[int], List[Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]]]:
    """Cells of the tile order: start positions and (group, first c, extent) per axis, in order."""
    tile = resolved_tile(p)
    starts, cells, pos = [], [], 0
    for group in itertools.product(*(range(d) for d in p.dilations)):
        lengths = [p.group_length(a, g) for a, g in enumerate(group)]
        counts = [cdiv(n, t) for n, t in zip(lengths, tile)]
        for t_idx in itertools.product(*(range(c) for c in counts)):
            first = tuple(i * t for i, t in zip(t_idx, tile))
            extent = tuple(min(t, n - f) for t, n, f in zip(tile, lengths, first))
            starts.append(pos)
            cells.append((group, first, extent))
            pos += math.prod(extent)
    return starts, cells


def run_boxes(start: int, stop: int, shape: Tuple[int, ...]) -> List[Tuple[Tuple[int, int], ...]]:
    """Boxes (half-open per-axis ranges) covering row-major positions [start, stop) of ``shape``.

    At most 2 * ndim - 1 boxes: a partial leading row, whole rows, a partial trailing row, recursively.
    """
    if start >= stop:
        return []
    if len(shape) == 1:
        return [((start, stop),)]
    inner = math.prod(shape[1:])
    r0, o0, r1, o1 = start // inner, start % inner, stop // inner, stop % inner
    if r0 == r1:
        return [((r0, r0 + 1),) + b for b in run_boxes(o0, o1, shape[1:])]
    boxes, whole_from = [], r0
    if o0:
        boxes += [((r0, r0 + 1),) + b for b in run_boxes(o0, inner, shape[1:])]
        whole_from = r0 + 1
    if r1 > whole_from:
        boxes.append(((whole_from, r1),) + tuple((0, n) for n in shape[1:]))
    if o1:
        boxes += [((r1, r1 + 1),) + b for b in run_boxes(0, o1, shape[1:])]
    return boxes


def _raw_desc(lo: int, hi: int, d: int) -> Desc:
    """Raw coordinates [lo, hi) of one axis (all its dilation groups)."""
    return (0, lo, hi - 1) if d == 1 else (-1, lo, hi - 1)


@functools.lru_cache(maxsize=64)
def row_major_blocks(p: GridPattern, block: int) -> List[List[Box]]:
    """Boxes of each kernel block of ``block`` consecutive row-major positions."""
    return [
        [tuple(_raw_desc(lo, hi, d) for (lo, hi), d in zip(box, p.dilations)) for box in run_boxes(s, min(s + block, p.n_tokens), p.shape)]
        for s in range(0, p.n_tokens, block)
    ]


@functools.lru_cache(maxsize=64)
def tile_blocks(p: GridPattern, block: int) -> List[List[Box]]:
    """Boxes of each kernel block of ``block`` consecutive positions in tile order."""
    starts, cells = _cells(p)
    out = []
    for s in range(0, p.n_tokens, block):
        stop = min(s + block, p.n_tokens)
        boxes: List[Box] = []
        i = bisect.bisect_right(starts, s) - 1
        while i < len(cells) and starts[i] < stop:
            group, first, extent = cells[i]
            lo, hi = max(s, starts[i]) - starts[i], min(stop, starts[i] + math.prod(extent)) - starts[i]
            for box in run_boxes(lo, hi, extent):
                boxes.append(tuple((g, f + a, f + b - 1) for (a, b), f, g in zip(box, first, group)))
            i += 1
        out.append(boxes)
    return out
