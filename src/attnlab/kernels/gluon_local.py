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
# the Triton kernel (0.341 vs 0.312 ms, h200_gluon_s7.md); ``local_attention`` still takes such plans.
KV_TILES = {1: [(128,)], 2: [(8, 16), (16, 8)]}  # the first tile-aligned pair wins
DEFAULTS = dict(num_buf=2, consumer_regs=232, maxnreg=168)  # measured best on an H200 (h200_gluon_s7.md)
# The dispatcher takes this kernel unless its tiles visit more than WORK_RATIO x the pairs the Triton
# kernel's smaller tiles visit: it runs ~1.25-1.4x faster per pair (dense 1.0 vs 0.79 of cuDNN), so
# 2-D NA k=33 (1.33x the pairs) still wins, HaloNet's 8-wide halo (1.5x) does not (h200_gluon_s7.md).
WORK_RATIO = 1.4


def _kernel():
    from .gluon_local_kernel import local_fwd

    return local_fwd


def as_2d(plan: _tl.Plan) -> tuple[tuple[int, int], ...]:
    """(q tile, kv tile, q grid, kv grid, query tiles per grid row) of a 1-D or 2-D plan as 2-D shapes:
    a 1-D plan is one grid row."""
    if plan.ndim == 1:
        return ((1, plan.q_tile[0]), (1, plan.kv_tile[0]), (1, plan.q_grid[0]), (1, plan.kv_grid[0]),
                (plan.n_q_tiles[0],))
    return (plan.q_tile[:2], plan.kv_tile[:2], plan.q_grid[:2], plan.kv_grid[:2], (plan.n_q_tiles[1],))


def copies(tile: tuple[int, int], limit: int) -> tuple[int, int]:
    """(copies, tokens per copy) that move a (rows, cols) tile of a row-major grid: one TMA copy holds
    contiguous tokens, at most ``limit`` of them, a multiple of 8 (the swizzle atom of the slot)."""
    chunk = min(tile[1], limit)
    if tile[1] % chunk or chunk % 8:
        raise NotImplementedError(f"tile {tile} does not split into contiguous copies of a multiple of 8 tokens")
    return tile[0] * tile[1] // chunk, chunk


@dataclass(frozen=True)
class Route:
    """What the kernel needs for one plan on one device."""

    plan: _tl.Plan
    boxes: torch.Tensor  # (n_q_tiles, 4) int32: first key tile (grid row, grid column) and the box's extent
    bounds: tuple[torch.Tensor, ...]  # lo0, hi0 (per grid row), lo1, hi1 (per grid column), int32
    masked: bool  # some visited tiles are partial


def visited_boxes(plan: _tl.Plan) -> torch.Tensor | None:
    """(n_q_tiles, 4) int32 on the CPU: each query tile's box of visited key tiles (mask-free box and
    partial list together) as (first row tile, first column tile, rows, columns) of the 2-D view; None
    when some query tile's tiles do not fill their bounding box or a query tile visits none."""
    f, cnt, idx = plan.fbox.cpu().long(), plan.part_cnt.cpu().long(), plan.part_idx.cpu().long()
    n_k1 = plan.n_kv_tiles[1] if plan.ndim == 2 else 1
    if plan.ndim == 1:
        full = (torch.zeros_like(f[:, 0]), f[:, 0], torch.ones_like(f[:, 0]), f[:, 3])
    else:
        full = (f[:, 0], f[:, 1], f[:, 3], f[:, 4])
    p0, p1 = (idx // n_k1, idx % n_k1) if plan.ndim == 2 else (torch.zeros_like(idx), idx)
    valid = torch.arange(idx.shape[1])[None, :] < cnt[:, None]
    has_full = (full[2] * full[3]) > 0
    big = 1 << 30

    def lo_hi(start, extent, part):
        lo = torch.where(has_full, start, big).minimum(torch.where(valid, part, big).amin(1))
        hi = torch.where(has_full, start + extent, -big).maximum(torch.where(valid, part + 1, -big).amax(1))
        return lo, hi

    lo0, hi0 = lo_hi(full[0], full[2], p0)
    lo1, hi1 = lo_hi(full[1], full[3], p1)
    visited = full[2] * full[3] + cnt
    if bool((visited < 1).any()) or not torch.equal((hi0 - lo0) * (hi1 - lo1), visited):
        return None
    return torch.stack([lo0, lo1, hi0 - lo0, hi1 - lo1], 1).to(torch.int32)


def prepare(plan: _tl.Plan, device: torch.device) -> Route | None:
    """The plan's ``Route`` on ``device``, or None when ``visited_boxes`` is None."""
    boxes = visited_boxes(plan)
    if boxes is None:
        return None
    b = [x.to(device=device, dtype=torch.int32) for x in plan.bounds]
    if plan.ndim == 1:  # one grid row: every query sees key row 0
        one = torch.ones(1, dtype=torch.int32, device=device)
        bounds = (one - 1, one, b[0], b[1])
    else:
        bounds = (b[0], b[1], b[2], b[3])
    return Route(plan, boxes.to(device), bounds, plan.tiles_full != plan.tiles_visited)


def unsupported(plan: _tl.Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why this kernel cannot run the call, or None when it can (``prepare`` must also give a Route)."""
    if not AVAILABLE:
        return "Triton with Gluon is not installed"
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] != 9:
        return f"the Gluon kernel needs a Hopper GPU (compute capability 9.x); got {q.device}"
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        return f"the Gluon kernel takes float16/bfloat16 q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
    d = q.shape[-1]
    if d not in (64, 128) or k.shape[-1] != d or v.shape[-1] != d:
        return f"the Gluon kernel takes D = Dv in (64, 128); got D={d}, Dv={v.shape[-1]}"
    if plan.ndim > 2:
        return f"the Gluon kernel covers 1-D and 2-D grids; got {plan.ndim}-D"
    qt, kt, qg, kg, _ = as_2d(plan)
    if math.prod(qt) != 128 or math.prod(kt) not in (64, 128):
        return f"the Gluon kernel needs 128-token query tiles and 64/128-token key tiles; got {qt}, {kt}"
    if any(g % t for g, t in zip(qg + kg, qt + kt)):
        return "the Gluon kernel needs grids divisible by the tiles"
    return None


@functools.lru_cache(maxsize=64)
def cached_route(pattern, n_q: int, n_kv: int, device: torch.device) -> Route | None:
    """The ``Route`` of the first tile pair of ``Q_TILES`` x ``KV_TILES`` that divides the grids and whose
    visited tiles are boxes, or None. Cached per pattern and shape like ``triton_local.cached_plan``."""
    axes = _tl.axes_for(pattern, n_q, n_kv)
    if axes is None or len(axes) not in Q_TILES:
        return None
    for qt in Q_TILES[len(axes)]:
        for kt in KV_TILES[len(axes)]:
            if any(a.n_q % t or a.n_kv % u for a, t, u in zip(axes, qt, kt)):
                continue
            route = prepare(_tl.cached_plan(pattern, n_q, n_kv, qt, kt, torch.device("cpu")), device)
            if route is not None:
                return route
    return None


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, route: Route, *,
                    scale: float | None = None, num_buf: int = 2, consumer_regs: int = 232,
                    maxnreg: int = 168, programs: int | None = None) -> torch.Tensor:
    """Run the kernel for a prepared ``route`` (``prepare`` of a ``triton_local.build_plan`` plan).

    Args:
        q: (B, Hq, Nq, D), k/v: (B, Hkv, Nk, D), row-major token order of the plan's grids; Hq a multiple
            of Hkv. scale: multiplier of q k^T, default 1/sqrt(D). num_buf: key/value ring slots (2 or 3).
        consumer_regs, maxnreg: registers per thread of the second consumer warpgroup and the kernel's cap
            (the first warpgroup gets what the cap leaves).
        programs: a persistent grid of this many programs (e.g. the multiprocessor count), each walking
            (query tile, head) items in turn; None: one program per item.

    Returns:
        (B, Hq, Nq, D) in q's dtype; rows that see no key are zeros. NotImplementedError with the reason
        for calls it does not cover.
    """
    plan = route.plan
    why = unsupported(plan, q, k, v)
    if why:
        raise NotImplementedError(why)
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if H % Hkv or Nq != math.prod(plan.q_grid) or Nk != math.prod(plan.kv_grid):
        raise ValueError(f"plan grids {plan.q_grid}/{plan.kv_grid} or heads do not match q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    q, k, v = (t.contiguous() for t in (q, k, v))  # the kernel reads (B*H*N, D) rows
    qt, kt, qg, kg, (n_qt1,) = as_2d(plan)
    q_rows, q_chunk = copies(qt, 64)
    k_rows, k_chunk = copies(kt, 256)
    out = torch.empty_like(q)
    _tl._set_allocator()
    scale = D ** -0.5 if scale is None else float(scale)
    n_qt = math.prod(plan.n_q_tiles)
    n_work = n_qt * B * H
    grid = n_work if programs is None else min(n_work, programs)
    _kernel()[(grid,)](
        q, k, v, out, route.boxes, *route.bounds, Nq, Nk, H, H // Hkv, n_qt, n_qt1, n_work, qt[0] * qg[1], qt[1],
        qg[1], kt[0] * kg[1], kt[1], kg[1], scale * LOG2E,
        Q_ROWS=q_rows, Q_CHUNK=q_chunk, Q_WIDTH=qt[1], K_ROWS=k_rows, K_CHUNK=k_chunk, K_WIDTH=kt[1],
        BLOCK_M=math.prod(qt), BLOCK_N=math.prod(kt), HEAD_D=D, NUM_BUF=num_buf, CONSUMER_REGS=consumer_regs,
        MASKED=route.masked, num_warps=4, maxnreg=maxnreg)
    return out


def visited_pairs(plan: _tl.Plan) -> int:
    """Query-key pairs the plan's tiles cover (the work a kernel on it does, masked or not)."""
    return plan.tiles_visited * math.prod(plan.q_tile) * math.prod(plan.kv_tile)


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def applies(q: torch.Tensor, k: torch.Tensor, pattern) -> bool:
    """Whether this kernel can run attention of q (B, Hq, Nq, D) on k (B, Hkv, Nk, D) (values shaped like
    the keys) under ``pattern``: the dispatcher then prefers it to grouped dense SDPA."""
    if not AVAILABLE or q.device.type != "cuda" or pattern is None:
        return False
    route = cached_route(pattern, q.shape[2], k.shape[2], q.device)
    return route is not None and unsupported(route.plan, q, k, k) is None


def run_pattern(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern, scale: float,
                baseline_pairs: int | None = None) -> torch.Tensor:
    """The dispatcher's entry on CUDA (before the Triton kernel): the kernel with ``DEFAULTS`` and a
    persistent grid of one program per multiprocessor, when the pattern has a route and its tiles visit
    at most ``WORK_RATIO`` x ``baseline_pairs`` pairs (the Triton kernel's plan); NotImplementedError
    otherwise."""
    if not AVAILABLE or q.device.type != "cuda":
        raise NotImplementedError("the Gluon kernel needs CUDA and Triton with Gluon")
    route = cached_route(pattern, q.shape[2], k.shape[2], q.device)
    if route is None:
        raise NotImplementedError(f"pattern {pattern!r} has no plan of key-tile boxes on 128-token query tiles")
    if baseline_pairs is not None and visited_pairs(route.plan) > WORK_RATIO * baseline_pairs:
        raise NotImplementedError(f"its 128-token tiles visit {visited_pairs(route.plan) / baseline_pairs:.2f}x "
                                  f"the pairs of the Triton kernel's tiles (> {WORK_RATIO})")
    return local_attention(q, k, v, route, scale=scale, programs=_multiprocessors(q.device), **DEFAULTS)
