"""Local attention (1-D/2-D windows, neighborhoods, blocks, causal, dense) on Hopper: a warp-specialized Gluon kernel.

The kernel (``gluon_local_kernel.py``) follows FlashAttention-3's schedule ("FlashAttention-3: Fast and
Accurate Attention with Asynchrony and Low-precision", Shah et al., 2024): a producer warp feeds key/value
tiles by TMA into a ring of shared-memory slots and two consumer warpgroups, each holding half of a
128-row query tile, take turns on the tensor cores (ping-pong), so one's softmax hides behind the other's
matrix products. Triton's own pipeliner does not produce that schedule; attnlab's Triton kernels run
dense work at 0.77-0.82 of cuDNN's rate on an H200, this one at cuDNN's (benchmarks/results/h200_gluon_s7.md).

It runs plans whose visited key tiles form a box per query tile (1-D windows, causal, documents, 2-D
neighborhoods and HaloNet blocks without dilation): tiles inside every row's window run mask-free, partial
ones with each row's window as a mask (tile-aligned patterns, e.g. strided neighborhoods in paper 27's
perfectly block-sparse case, have none). Query tiles of 128 tokens, key tiles of 64 or 128; head dim 64 or
128 (Dv = D); float16/bfloat16; GQA; Nq != Nk. Anything else raises NotImplementedError and the caller
keeps the Triton kernel. Needs CUDA compute capability 9.x and Triton with Gluon; ``AVAILABLE`` says
whether Gluon imports.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from . import triton_local as _tl

try:
    from triton.experimental import gluon as _gluon  # noqa: F401

    AVAILABLE = True
except ImportError:  # Triton without Gluon (< 3.5) or no Triton at all
    AVAILABLE = False

LOG2E = 1.4426950408889634
Q_TILES = {1: [(128,)], 2: [(8, 16), (16, 8)]}  # 128-row query tiles: two 64-row warpgroup halves
# 128-key tiles only: with 64-key tiles (HaloNet's 8 x 8, one program per item) the kernel ran slower than
# the Triton kernel (0.341 vs 0.312 ms); boxes at any token offset make 128-key tiles exact there (0.300 ms).
KV_TILES = {1: [(128,)], 2: [(8, 16), (16, 8), (4, 32)]}  # the one covering the fewest pairs wins
DEFAULTS = dict(num_buf=2, consumer_regs=232, maxnreg=168)  # measured best on an H200 (h200_gluon_s7.md)
# Auto mode takes this kernel unless its boxes cover more than WORK_RATIO x the pairs the Triton kernel's
# tiles visit (``preferred``): it runs ~1.25-1.4x faster per pair (dense 1.0 vs 0.79 of cuDNN; h200_gluon_s7.md).
WORK_RATIO = 1.4


def _kernel():
    from .gluon_local_kernel import local_fwd

    return local_fwd


@dataclass(frozen=True)
class Route:
    """What the kernel needs for one pattern, shape and device, in the 2-D view (a 1-D grid is one row)."""

    q_tile: tuple[int, int]
    kv_tile: tuple[int, int]
    q_grid: tuple[int, int]
    kv_grid: tuple[int, int]
    boxes: torch.Tensor  # (n_q_tiles, 4) int32: first key row and column (tokens), extent in key tiles
    bounds: tuple[torch.Tensor, ...]  # lo0, hi0 (per grid row), lo1, hi1 (per grid column), int32
    extremes: torch.Tensor  # (n_q_tiles, 2, 5) int32 per 64-row half: max lo0, min hi0, max lo1, min hi1, uniform
    masked: bool  # some query tile's box holds keys outside some of its rows' windows
    pairs: int  # query-key pairs the kernel computes, masked or not (a host int: no device sync per call)

    @property
    def n_q_tiles(self) -> tuple[int, int]:
        return self.q_grid[0] // self.q_tile[0], self.q_grid[1] // self.q_tile[1]


def _tile_span(lo: torch.Tensor, hi: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query tile of ``tile`` positions along one axis: the union [first, end) of its rows' key
    windows [lo, hi) (rows with empty windows ignored; end <= first if all are empty), and whether every
    row of the tile has exactly that window."""
    lo, hi = lo.long(), hi.long()
    first, end = _tl.window_union(lo, hi, tile, 1 << 30)
    lo, hi = lo.view(-1, tile), hi.view(-1, tile)
    return first, end, ((lo == first[:, None]) & (hi == end[:, None])).all(1)


def window_boxes(q_tile: tuple[int, int], kv_tile: tuple[int, int], bounds) -> tuple[torch.Tensor, bool] | None:
    """Per query tile (row-major over the tile grid), the box of keys that holds its rows' windows:
    (first key row, first key column, rows of key tiles, columns of key tiles) as an (n_q_tiles, 4) int32
    CPU tensor, and whether any box holds keys outside a row's window (the kernel then masks). ``bounds``:
    lo0, hi0 (per query grid row), lo1, hi1 (per query grid column). None when a query tile sees no key."""
    r0, r1, r_exact = _tile_span(bounds[0].cpu(), bounds[1].cpu(), q_tile[0])
    c0, c1, c_exact = _tile_span(bounds[2].cpu(), bounds[3].cpu(), q_tile[1])
    if bool((r1 <= r0).any() or (c1 <= c0).any()):
        return None
    nr, nc = -(-(r1 - r0) // kv_tile[0]), -(-(c1 - c0) // kv_tile[1])
    a, b = torch.meshgrid(torch.arange(len(r0)), torch.arange(len(c0)), indexing="ij")
    a, b = a.flatten(), b.flatten()
    boxes = torch.stack([r0[a], c0[b], nr[a], nc[b]], 1).to(torch.int32)
    exact = bool(r_exact.all() and c_exact.all() and not ((r1 - r0) % kv_tile[0]).any()
                 and not ((c1 - c0) % kv_tile[1]).any())
    return boxes, not exact


def half_extremes(q_tile: tuple[int, int], q_grid: tuple[int, int], bounds) -> torch.Tensor:
    """Per query tile (row-major over the tile grid) and 64-row half of it (one consumer warpgroup's rows):
    max(lo0), min(hi0), max(lo1), min(hi1) over its rows, which decide whether a key tile needs a mask,
    and 1 when all its rows share one window (the mask is then one vector over the keys), as an
    (n_q_tiles, 2, 5) int32 CPU tensor. ``bounds`` as in ``window_boxes``."""
    lo0, hi0, lo1, hi1 = (b.cpu().long() for b in bounds)
    m = torch.arange(math.prod(q_tile))
    a, b = torch.meshgrid(torch.arange(q_grid[0] // q_tile[0]), torch.arange(q_grid[1] // q_tile[1]), indexing="ij")
    y = a.reshape(-1, 1) * q_tile[0] + m // q_tile[1]  # (n_q_tiles, rows of the tile): grid row of each row
    x = b.reshape(-1, 1) * q_tile[1] + m % q_tile[1]
    per_row = [t.view(len(y), 2, -1) for t in (lo0[y], hi0[y], lo1[x], hi1[x])]
    ext = [per_row[0].amax(-1), per_row[1].amin(-1), per_row[2].amax(-1), per_row[3].amin(-1)]
    uniform = torch.stack([(t.amax(-1) == t.amin(-1)) for t in per_row]).all(0)
    return torch.stack(ext + [uniform.long()], -1).to(torch.int32)


@functools.lru_cache(maxsize=8)
def _major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def unsupported(route: Route, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why this kernel cannot run the call on ``route``, or None when it can."""
    if not AVAILABLE:
        return "Triton with Gluon is not installed"
    if q.device.type != "cuda" or _major(q.device) != 9:
        return f"the Gluon kernel needs a Hopper GPU (compute capability 9.x); got {q.device}"
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        return f"the Gluon kernel takes float16/bfloat16 q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
    d = q.shape[-1]
    if d not in (64, 128) or k.shape[-1] != d or v.shape[-1] != d:
        return f"the Gluon kernel takes D = Dv in (64, 128); got D={d}, Dv={v.shape[-1]}"
    if q.shape[2] != math.prod(route.q_grid) or k.shape[2] != math.prod(route.kv_grid) or q.shape[1] % k.shape[1]:
        return f"q {tuple(q.shape)} / k {tuple(k.shape)} do not match the route's grids or head groups"
    return None


@functools.lru_cache(maxsize=64)
def cached_route(pattern, n_q: int, n_kv: int, device: torch.device) -> Route | None:
    """The ``Route`` of a pattern on 1-D or 2-D grids: 128-token query tiles of ``Q_TILES`` that divide the
    grid, the key tiles of ``KV_TILES`` whose boxes cover the fewest pairs; None for other patterns (3-D,
    not interval-separable) or when a query tile sees no key. Cached per pattern and shape."""
    axes = _tl.axes_for(pattern, n_q, n_kv)
    if axes is None or len(axes) not in Q_TILES:
        return None
    if len(axes) == 1:  # one grid row: every query sees key row 0
        zero, one = torch.zeros(1, dtype=torch.int64), torch.ones(1, dtype=torch.int64)
        bounds, q_grid, kv_grid = (zero, one, axes[0].lo, axes[0].hi), (1, n_q), (1, n_kv)
    else:
        bounds = (axes[0].lo, axes[0].hi, axes[1].lo, axes[1].hi)
        q_grid, kv_grid = (axes[0].n_q, axes[1].n_q), (axes[0].n_kv, axes[1].n_kv)
    best = None
    for qt in Q_TILES[len(axes)]:
        qt2 = (1, qt[0]) if len(axes) == 1 else qt
        if q_grid[0] % qt2[0] or q_grid[1] % qt2[1]:
            continue
        extremes = half_extremes(qt2, q_grid, bounds).to(device)
        for kt in KV_TILES[len(axes)]:
            kt2 = (1, kt[0]) if len(axes) == 1 else kt
            boxes = window_boxes(qt2, kt2, bounds)
            if boxes is None:
                return None
            pairs = int((boxes[0][:, 2].long() * boxes[0][:, 3]).sum()) * math.prod(qt2) * math.prod(kt2)
            route = Route(qt2, kt2, q_grid, kv_grid, boxes[0].to(device),
                          tuple(b.to(device=device, dtype=torch.int32) for b in bounds),
                          extremes, boxes[1], pairs)
            if best is None or route.pairs < best.pairs:
                best = route
    return best


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, route: Route, *,
                    scale: float | None = None, num_buf: int = 2, consumer_regs: int = 232,
                    maxnreg: int = 168, programs: int | None = None) -> torch.Tensor:
    """Run the kernel on a ``route`` (``cached_route``).

    Args:
        q: (B, Hq, Nq, D), k/v: (B, Hkv, Nk, D), row-major token order of the route's grids; Hq a multiple
            of Hkv. scale: multiplier of q k^T, default 1/sqrt(D). num_buf: key/value ring slots (2 or 3).
        consumer_regs, maxnreg: registers per thread of the second consumer warpgroup and the kernel's cap
            (the first warpgroup gets what the cap leaves).
        programs: a persistent grid of this many programs (e.g. the multiprocessor count), each walking
            (query tile, head) items in turn; None: one program per item.

    Returns:
        (B, Hq, Nq, D) in q's dtype; rows that see no key are zeros. NotImplementedError with the reason
        for calls it does not cover.
    """
    why = unsupported(route, q, k, v)
    if why:
        raise NotImplementedError(why)
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    q, k, v = (t.contiguous() for t in (q, k, v))  # the kernel reads (B*H*N, D) rows
    qt, kt, qg, kg = route.q_tile, route.kv_tile, route.q_grid, route.kv_grid
    out = torch.empty_like(q)
    _tl._set_allocator()
    scale = D ** -0.5 if scale is None else float(scale)
    n_qt = math.prod(route.n_q_tiles)
    n_work = n_qt * B * H
    grid = n_work if programs is None else min(n_work, programs)
    _kernel()[(grid,)](
        q, k, v, out, route.boxes, route.extremes, *route.bounds, Nq, Nk, H, H // Hkv, n_qt, route.n_q_tiles[1], n_work,
        qg[1], kg[1], scale * LOG2E, Q_WIDTH=qt[1], K_WIDTH=kt[1],
        BLOCK_M=math.prod(qt), BLOCK_N=math.prod(kt), HEAD_D=D, NUM_BUF=num_buf, CONSUMER_REGS=consumer_regs,
        MASKED=route.masked, Q_EARLY=qt[0] == 1, num_warps=4, maxnreg=maxnreg)  # Q_EARLY: 1-D tiles (see the kernel)
    return out


def visited_pairs(plan: _tl.Plan) -> int:
    """Query-key pairs a Triton-kernel plan's tiles cover (the work it does, masked or not)."""
    return plan.tiles_visited * math.prod(plan.q_tile) * math.prod(plan.kv_tile)


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def applies(q: torch.Tensor, k: torch.Tensor, pattern) -> bool:
    """Whether this kernel can run attention of q (B, Hq, Nq, D) on k (B, Hkv, Nk, D) (values shaped like
    the keys) under ``pattern``."""
    if not AVAILABLE or q.device.type != "cuda" or pattern is None:
        return False
    route = cached_route(pattern, q.shape[2], k.shape[2], q.device)
    return route is not None and unsupported(route, q, k, k) is None


def preferred(q: torch.Tensor, k: torch.Tensor, pattern) -> bool:
    """Whether auto mode runs this kernel: it ``applies`` and its boxes cover at most ``WORK_RATIO`` x the
    pairs of the Triton kernel's tiles (which the dispatcher takes otherwise)."""
    if not applies(q, k, pattern):
        return False
    tiles = _tl._route(pattern, q.shape[2], k.shape[2], _tl.tile_head_dim(q, k), q.device)
    if tiles is None:
        return True
    plan = _tl.cached_plan(pattern, q.shape[2], k.shape[2], tiles[0], tiles[1], q.device)
    return cached_route(pattern, q.shape[2], k.shape[2], q.device).pairs <= WORK_RATIO * visited_pairs(plan)


def run_pattern(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern, scale: float) -> torch.Tensor:
    """The dispatcher's entry on CUDA (``attnlab.attention(..., kernel="gluon")`` and auto mode where
    ``preferred``): the kernel with ``DEFAULTS`` and a persistent grid of one program per multiprocessor.
    Shapes as in ``attention``; NotImplementedError with the reason for calls it does not cover."""
    if not AVAILABLE or q.device.type != "cuda":
        raise NotImplementedError("the Gluon kernel needs CUDA and Triton with Gluon (3.5+)")
    route = None if pattern is None else cached_route(pattern, q.shape[2], k.shape[2], q.device)
    if route is None:
        raise NotImplementedError(f"pattern {pattern!r} has no plan of key-tile boxes on 128-token query tiles")
    return local_attention(q, k, v, route, scale=scale, programs=_multiprocessors(q.device), **DEFAULTS)
