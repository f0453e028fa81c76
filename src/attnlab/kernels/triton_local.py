"""attnlab's Triton kernel for local attention: 1-D sliding windows and 1/2/3-D neighborhoods.

A flash-attention forward (online softmax, bf16/fp16 tiles, fp32 accumulation) in which every
query tile visits only the key tiles its window can reach, and evaluates a per-element mask only
on the tiles where the window edge cuts through (interior tiles run mask-free). This is the idea
of the fused kernels in "Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention
at the Threadblock Level" (Hassani et al., 2024) and of the token permutation in "Generalized
Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light" (Hassani et al.,
2025): a query tile is a box of the token grid (say 8 x 16 tokens), so the keys it needs form a
small box of key tiles.

The geometry is *interval-separable*: along each grid axis a, query coordinate x sees the key
coordinates ``lo_a[x] <= y < hi_a[x]``, and a (query, key) pair is allowed when every axis allows
it. Sliding windows (causal or not, Nq != Nk aligned bottom-right), neighborhoods with NATTEN
semantics (border shift, stride, causal) and HaloNet blocks all have this form; dilation > 1 does
not (its window is not an interval) and stays on FlexAttention.

The permutation into tiles is fused: the kernel reads q/k/v and writes the output in their own
(row-major) token order, gathering each tile's rows by index, so no permuted copies are made.

Shapes: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), Hq % Hkv == 0; Nq = prod(q_grid),
Nk = prod(kv_grid). CUDA only (Triton); with ``TRITON_INTERPRET=1`` it also runs on CPU tensors.

Measured on an H200 (benchmarks/results/h200_kernels.md, B=1, 16 heads, D=128, bf16): with every tile
full it runs at ~0.8 of cuDNN's dense SDPA, so a pattern reaches ~0.8 x (element / block density) of
the ideal 1/density speed-up: 0.42 for a 2-D k=33 neighborhood on 128x128 (FlexAttention 0.08-0.14),
0.67 for a 1-D N/16 window at 32K (Flex 0.61), 0.61-0.72 for tile-aligned strided/blocked cases.
Session 5's sweeps of tiles, warps, stages and kernel options (benchmarks/results/h200_triton_sweep_s5a.md,
_s5b.md; ``default_options``) moved the defaults; in the confirm run (h200_triton_confirm_s5.md, do_bench)
1-D window N/16 at 32K 0.67 -> 0.70 (flattened persistent grid; 0.73-0.75 in the sweeps), 2-D strided k=48
s=16 0.72 -> 0.74 and HaloNet blocks 0.61 -> 0.63-0.65 (no masked loop on tile-aligned plans); the core
with every tile full stays at 0.78-0.79 of cuDNN. 16-bit exponentials, TMA loads, hints, 2 or 4 stages,
64-row tiles and warp specialization (fails to compile on 64-row tiles) did not help.
Since session 6, auto mode hands long 1-D windows to ``dense_core.py`` (cuDNN for each tile's fully
visible keys, this kernel for the edges, started from cuDNN's result): 0.74 of the ideal at N/16, 32K.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..core.checks import check_qkv

MAX_DIMS = 3


# ----------------------------------------------------------------------------------------------
# Geometry: per-axis window bounds and the tile lists a query tile visits.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """One grid axis: query coordinate x in [0, n_q) sees key coordinates [lo[x], hi[x]) of [0, n_kv)."""

    n_q: int
    n_kv: int
    lo: torch.Tensor  # (n_q,) int64
    hi: torch.Tensor  # (n_q,) int64, exclusive

    def __hash__(self):  # tensors are not hashable; plans are cached by the caller's own key
        return id(self)


def window_axis(n_q: int, n_kv: int, left: int, right: int) -> Axis:
    """1-D band: query i (aligned to key position p = i + Nk - Nq) sees keys p-left .. p+right."""
    p = torch.arange(n_q, dtype=torch.int64) + (n_kv - n_q)
    lo = torch.clamp(p - left, 0, n_kv)
    hi = torch.clamp(p + right + 1, 0, n_kv)
    return Axis(n_q, n_kv, lo, torch.maximum(hi, lo))


def axis_from_mask(mask: torch.Tensor) -> Axis:
    """Bounds from a dense bool (n_q, n_kv) 1-D mask whose rows are intervals (raises ValueError if not)."""
    n_q, n_kv = mask.shape
    idx = torch.arange(n_kv)
    any_ = mask.any(1)
    lo = torch.where(mask, idx, n_kv).min(1).values
    hi = torch.where(mask, idx + 1, 0).max(1).values
    lo = torch.where(any_, lo, 0)
    hi = torch.where(any_, hi, 0)
    if int(mask.sum()) != int((hi - lo).sum()):
        raise ValueError("mask rows are not contiguous intervals (dilation > 1?); use FlexAttention")
    return Axis(n_q, n_kv, lo.to(torch.int64), hi.to(torch.int64))


@dataclass
class Plan:
    """Everything the kernel needs for one geometry, tile shape and device (built once, cached)."""

    q_grid: tuple[int, int, int]
    kv_grid: tuple[int, int, int]
    q_tile: tuple[int, int, int]
    kv_tile: tuple[int, int, int]
    ndim: int
    bounds: list[torch.Tensor]  # 2 * MAX_DIMS int32 tensors: lo0, hi0, lo1, hi1, lo2, hi2
    full_idx: torch.Tensor  # (n_q_tiles, max_full) int32 flat key-tile ids, mask-free
    full_cnt: torch.Tensor  # (n_q_tiles,) int32
    part_idx: torch.Tensor  # (n_q_tiles, max_part) int32 key tiles that need the element mask
    part_cnt: torch.Tensor
    fbox: torch.Tensor  # (n_q_tiles, 6) int32: corner (3) and extent (3) of the box of full tiles
    n_q_tiles: tuple[int, int, int]
    n_kv_tiles: tuple[int, int, int]
    tiles_visited: int  # sum over query tiles of key tiles visited (for the block density)
    tiles_full: int
    order: torch.Tensor | None = None  # (n_q_tiles,) int32 launch order of the query tiles; None: in turn

    @property
    def block_density(self) -> float:
        return self.tiles_visited / (math.prod(self.n_q_tiles) * math.prod(self.n_kv_tiles))


def _pad3(t: tuple[int, ...], fill: int = 1) -> tuple[int, int, int]:
    return tuple(t) + (fill,) * (MAX_DIMS - len(t))  # type: ignore[return-value]


def window_union(lo: torch.Tensor, hi: torch.Tensor, tile: int, big: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile of ``tile`` consecutive query positions (the last one padded): the union [lo_min, hi_max) of
    their non-empty key windows [lo, hi); (big, -1) for a tile whose windows are all empty (big > any hi)."""
    n_t = -(-lo.numel() // tile)
    pad = n_t * tile - lo.numel()
    empty = hi <= lo  # a query that sees nothing constrains nothing
    # Padded (invalid) queries get neutral values: they affect neither end of the union.
    lo_min = torch.nn.functional.pad(torch.where(empty, big, lo), (0, pad), value=big).view(n_t, tile).min(1).values
    hi_max = torch.nn.functional.pad(torch.where(empty, -1, hi), (0, pad), value=-1).view(n_t, tile).max(1).values
    return lo_min, hi_max


def _axis_tiles(axis: Axis, qt: int, kt: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per query tile along one axis: candidate key tiles (nq_t, R) as ids (-1 = none) and full flags."""
    n_qt = -(-axis.n_q // qt)
    n_kt = -(-axis.n_kv // kt)
    pad = n_qt * qt - axis.n_q
    lo, hi = axis.lo, axis.hi
    empty = hi <= lo
    big = axis.n_kv + 1
    lo_min, hi_max = window_union(lo, hi, qt, big)
    lo_max = torch.nn.functional.pad(torch.where(empty, big, lo), (0, pad), value=-1).view(n_qt, qt).max(1).values
    hi_min = torch.nn.functional.pad(torch.where(empty, -1, hi), (0, pad), value=big).view(n_qt, qt).min(1).values
    has = hi_max > lo_min
    first = torch.where(has, lo_min // kt, 0)
    last = torch.where(has, (hi_max - 1) // kt, -1)
    r = int((last - first + 1).clamp(min=0).max()) if n_qt else 0
    r = max(r, 1)
    cand = first[:, None] + torch.arange(r)[None, :]
    valid = cand <= last[:, None]
    k0 = cand * kt
    k1 = k0 + kt
    # Full along this axis: every query's interval covers the whole key tile, which lies in the grid.
    full = valid & (lo_max[:, None] <= k0) & (k1 <= hi_min[:, None]) & (k1 <= axis.n_kv)
    ids = torch.where(valid, cand, -1)
    return ids, full, n_kt


def build_plan(axes: list[Axis], q_tile: tuple[int, ...], kv_tile: tuple[int, ...], device) -> Plan:
    """Tile lists from per-axis bounds: O(query tiles x visited tiles) work, no Nq x Nk evaluation."""
    ndim = len(axes)
    if not 1 <= ndim <= MAX_DIMS or len(q_tile) != ndim or len(kv_tile) != ndim:
        raise ValueError(f"need 1..3 axes with one tile size per axis; got {ndim=}, {q_tile=}, {kv_tile=}")
    per_axis = [_axis_tiles(a, qt, kt) for a, qt, kt in zip(axes, q_tile, kv_tile)]
    n_kv_tiles = _pad3(tuple(p[2] for p in per_axis))
    n_q_tiles = _pad3(tuple(p[0].shape[0] for p in per_axis))
    # Combine axes: the visited box is the outer product of per-axis candidates.
    ids = torch.zeros(1, 1, dtype=torch.int64)
    valid = torch.ones(1, 1, dtype=torch.bool)
    full = torch.ones(1, 1, dtype=torch.bool)
    for (a_ids, a_full, n_kt) in per_axis:
        nq, r = a_ids.shape
        ids = (ids[:, None, :, None] * n_kt + a_ids.clamp(min=0)[None, :, None, :]).reshape(-1, ids.shape[1] * r)
        valid = (valid[:, None, :, None] & (a_ids >= 0)[None, :, None, :]).reshape(-1, valid.shape[1] * r)
        full = (full[:, None, :, None] & a_full[None, :, None, :]).reshape(-1, full.shape[1] * r)
    part = valid & ~full
    full = full & valid

    def pack(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cnt = sel.sum(1)
        width = max(int(cnt.max()) if cnt.numel() else 0, 1)
        order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)[:, :width]
        packed = torch.gather(ids, 1, order)
        packed = torch.where(torch.arange(width)[None, :] < cnt[:, None], packed, 0)
        return packed.to(torch.int32).contiguous().to(device), cnt.to(torch.int32).to(device)

    full_idx, full_cnt = pack(full)
    part_idx, part_cnt = pack(part)
    # The full tiles of a query tile are a box (a product of per-axis runs): corner and extent.
    corner, extent = [], []
    for (a_ids, a_full, _n) in per_axis:
        cnt = a_full.sum(1)
        first = torch.where(cnt > 0, torch.where(a_full, a_ids, a_ids.max() + 1).min(1).values, 0)
        corner.append(first)
        extent.append(cnt)
    fbox = torch.zeros(*(len(c) for c in corner), 6, dtype=torch.int64)
    for ax in range(MAX_DIMS):
        shape = [1] * ndim
        if ax < ndim:
            shape[ax] = -1
            fbox[..., ax] = corner[ax].view(shape)
            fbox[..., 3 + ax] = extent[ax].view(shape)
        else:
            fbox[..., 3 + ax] = 1
    fbox = fbox.view(-1, 6)
    assert torch.equal(fbox[:, 3:].prod(1), full.sum(1)), "full tiles must form a box"
    bounds = []
    for i in range(MAX_DIMS):
        if i < ndim:
            bounds += [axes[i].lo.to(torch.int32).to(device), axes[i].hi.to(torch.int32).to(device)]
        else:
            one = torch.ones(1, dtype=torch.int32, device=device)
            bounds += [torch.zeros(1, dtype=torch.int32, device=device), one]
    return Plan(
        q_grid=_pad3(tuple(a.n_q for a in axes)),
        kv_grid=_pad3(tuple(a.n_kv for a in axes)),
        q_tile=_pad3(tuple(q_tile)),
        kv_tile=_pad3(tuple(kv_tile)),
        ndim=ndim,
        bounds=bounds,
        full_idx=full_idx,
        full_cnt=full_cnt,
        part_idx=part_idx,
        part_cnt=part_cnt,
        fbox=fbox.to(torch.int32).contiguous().to(device),
        n_q_tiles=n_q_tiles,
        n_kv_tiles=n_kv_tiles,
        tiles_visited=int(valid.sum()),
        tiles_full=int(full.sum()),
    )


def dense_mask(axes: list[Axis]) -> torch.Tensor:
    """The bool (Nq, Nk) mask the geometry stands for, row-major tokens (for tests; small grids only)."""
    m = torch.ones(1, 1, dtype=torch.bool)
    for a in axes:
        y = torch.arange(a.n_kv)
        ma = (y[None, :] >= a.lo[:, None]) & (y[None, :] < a.hi[:, None])  # (n_q, n_kv)
        m = (m[:, None, :, None] & ma[None, :, None, :]).reshape(m.shape[0] * a.n_q, m.shape[1] * a.n_kv)
    return m


def density(axes: list[Axis]) -> float:
    """Fraction of allowed (query, key) pairs: separable, so a product of per-axis fractions."""
    d = 1.0
    for a in axes:
        d *= float((a.hi - a.lo).clamp(min=0).sum()) / (a.n_q * a.n_kv)
    return d


# ----------------------------------------------------------------------------------------------
# The kernel (built on first use so that importing attnlab never needs Triton).
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _kernel():
    from .triton_local_kernel import local_fwd

    return local_fwd


# ----------------------------------------------------------------------------------------------
# Host side.
# ----------------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634


def default_tiles(q_grid: tuple[int, ...], kv_grid: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """128-token query tiles and 64-token key tiles, shaped as boxes that fit the grid."""
    return _box(q_grid, 128), _box(kv_grid, 64)


def _box(grid: tuple[int, ...], size: int) -> tuple[int, ...]:
    """A power-of-two tile of `size` tokens: its factors of 2 go round-robin from the last (fastest)
    axis, so a tile row is a long contiguous run of memory, and no axis grows past the grid."""
    tile = [1] * len(grid)
    bits = size.bit_length() - 1
    while bits > 0:
        grown = False
        for i in reversed(range(len(grid))):
            if bits > 0 and tile[i] < _next_pow2(grid[i]):
                tile[i] *= 2
                bits -= 1
                grown = True
        if not grown:
            break
    while math.prod(tile) < 16:  # tl.dot needs tiles of at least 16 rows; extra rows are masked
        tile[-1] *= 2
    return tuple(tile)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _tma_ok(t: torch.Tensor, block: int) -> bool:
    """TMA boxes need the full head dim, 16-byte aligned bases and token strides."""
    size = t.element_size()
    return (block == t.shape[-1] and t.data_ptr() % 16 == 0
            and all((s * size) % 16 == 0 for s in t.stride()[:3]))


def _half_exp_mode(half_exp: bool, q: torch.Tensor) -> int:
    """The kernels' HALF_EXP: 0 float32 exp2; 1 bf16x2 / 2 f16x2 PTX (CUDA); 3 the interpreter's emulation."""
    if not half_exp or q.dtype == torch.float32:
        return 0
    if q.device.type != "cuda":
        return 3
    return 1 if q.dtype == torch.bfloat16 else 2


@functools.lru_cache(maxsize=1)
def _set_allocator() -> None:
    """Descriptors made inside a kernel need a little global scratch memory from the host."""
    import triton

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: Plan,
    *,
    scale: float | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    out: torch.Tensor | None = None,
    use_tma: bool = False,
    warp_specialize: bool = False,
    full_box: bool = True,
    late_l: bool = False,
    part_stages: int | None = None,
    hints: bool = False,
    persistent: int = 0,
    flatten: bool = False,
    maxnreg: int | None = None,
    half_exp: bool = False,
    init: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run the kernel for a prepared `plan` (see ``build_plan``).

    Args:
        q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv), row-major token order of the grids.
        plan: tile lists for the geometry; Nq and Nk must equal the products of its grids.
        scale: multiplier of q k^T, default 1/sqrt(D).
        use_tma: load key/value tiles as grid boxes with Hopper's tensor-memory copies (needs
            power-of-two head dims and 16-byte aligned strides; ignored otherwise).
        warp_specialize: ask Triton to warp-specialize the key loops.
        full_box: walk the mask-free tiles as a box from its corner (no per-step index loads; 0-8%
            faster on an H200); False reads them from the packed tile list like the partial ones.
        late_l: fold each tile's row sums into l after the p @ v product (Triton tutorial order).
        part_stages: software-pipeline stages of the masked-tile loop only (1 = not pipelined);
            default the kernel's ``num_stages``. 0 = no masked loop at all, for plans without partial
            tiles (tile-aligned patterns; ValueError otherwise).
        hints: ``tl.assume`` the host's guarantees (positive strides and counts) to the compiler.
        persistent: > 0 launches that many programs per multiprocessor, each walking (query tile,
            batch x head) items in turn (CUDA; under the interpreter a third of the items).
        flatten: with ``persistent``, let Triton flatten the item loop with the key loops into one
            software-pipelined loop (``tl.range(..., flatten=True)``).
        maxnreg: cap on registers per thread (Triton launch option).
        half_exp: exponentials in 16 bits (``ex2.approx`` on bf16x2 / f16x2 pairs; float16/bfloat16
            inputs only): p is rounded to 16 bits for p @ v anyway; small extra error in p.
        init: (idx, out0, lse0): query tile t starts from rows idx[t, 1] + [0, q_tile) of group
            idx[t, 0] (int32 (n_q_tiles, 2); group -1 = none) of a partial result already computed
            over some of its keys, out0 (G, B*Hq, R, Dv) normalised and lse0 (G, B*Hq, R) float32
            natural log-sum-exp, instead of from nothing (``dense_core.py``; the plan must then leave
            those keys out). 1-D plans only.
        Every option except ``init`` gives the same result; they exist to be measured
        (benchmarks/h200_triton_sweep.py).

    Returns:
        (B, Hq, Nq, Dv) in q's dtype. Rows with no allowed key are zeros.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if Nq != math.prod(plan.q_grid) or Nk != math.prod(plan.kv_grid):
        raise ValueError(f"plan grids {plan.q_grid=} {plan.kv_grid=} do not match {Nq=}, {Nk=}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"`q.dtype` must be float16, bfloat16 or float32 for the Triton kernel; got {q.dtype}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if out is None:
        out = torch.empty(B, Hq, Nq, Dv, dtype=q.dtype, device=q.device)
    scale = D ** -0.5 if scale is None else float(scale)
    big = q.shape[-1] > 128 or Dv > 128
    warps = num_warps or (8 if plan.q_tile[0] * plan.q_tile[1] * plan.q_tile[2] >= 128 else 4)
    stages = num_stages or (2 if big else 3)
    skip_part = part_stages == 0
    if skip_part and plan.tiles_full != plan.tiles_visited:
        raise ValueError(f"`part_stages=0` drops the masked loop, but this plan has "
                         f"{plan.tiles_visited - plan.tiles_full} partial tiles")
    n_qt = math.prod(plan.n_q_tiles)
    n_work = n_qt * B * Hq
    if persistent:
        progs = (torch.cuda.get_device_properties(q.device).multi_processor_count * persistent
                 if q.device.type == "cuda" else max(1, n_work // 3))
        grid = (min(n_work, progs), 1)
    else:
        grid = (n_qt, B * Hq)
    even_q = all(g % t == 0 for g, t in zip(plan.q_grid, plan.q_tile))
    even_k = all(g % t == 0 for g, t in zip(plan.kv_grid, plan.kv_tile))
    block_d, block_dv = max(16, _next_pow2(D)), max(16, _next_pow2(Dv))
    if use_tma:
        use_tma = _tma_ok(k, block_d) and _tma_ok(v, block_dv)
        if use_tma:
            _set_allocator()
    if init is None:
        init_args = (plan.full_cnt, out, plan.full_cnt) + (0,) * 6  # never read (INIT=False)
    else:
        idx, o0, lse0 = init
        if (plan.ndim != 1 or o0.shape[1] != B * Hq or o0.shape[3] != Dv or o0.shape[2] % plan.q_tile[0]
                or lse0.shape != o0.shape[:3] or idx.shape != (math.prod(plan.n_q_tiles), 2)):
            raise ValueError(f"`init` must hold (G, B*Hq, R, Dv) outputs (R a multiple of the query tile) and "
                             f"(n_q_tiles, 2) indices for a 1-D plan; got {tuple(o0.shape)}, {tuple(idx.shape)}")
        init_args = (idx, o0, lse0, *o0.stride()[:3], *lse0.stride())
    _kernel()[grid](
        q, k, v, out,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *plan.bounds,
        plan.full_idx, plan.full_cnt, plan.part_idx, plan.part_cnt,
        plan.full_idx.shape[1], plan.part_idx.shape[1], plan.fbox,
        *init_args, plan.full_cnt if plan.order is None else plan.order,
        scale * LOG2E, Hq, Hq // Hkv,
        *plan.q_grid, *plan.kv_grid,
        plan.n_q_tiles[1], plan.n_q_tiles[2], plan.n_kv_tiles[1], plan.n_kv_tiles[2], n_qt, n_work,
        NDIM=plan.ndim,
        QT0=plan.q_tile[0], QT1=plan.q_tile[1], QT2=plan.q_tile[2],
        KT0=plan.kv_tile[0], KT1=plan.kv_tile[1], KT2=plan.kv_tile[2],
        D=D, DV=Dv, BLOCK_D=block_d, BLOCK_DV=block_dv,
        EVEN_Q=even_q, EVEN_K=even_k, IEEE=q.dtype == torch.float32, USE_TMA=use_tma, WS=warp_specialize, FULL_BOX=full_box,
        LATE_L=late_l, PART_STAGES=None if skip_part else part_stages, HINTS=hints, SKIP_PART=skip_part, PERSIST=bool(persistent), FLATTEN=flatten and bool(persistent),
        HALF_EXP=_half_exp_mode(half_exp, q), INIT=init is not None, HAS_ORDER=plan.order is not None,
        num_warps=warps, num_stages=stages, **({} if maxnreg is None else {"maxnreg": maxnreg}),
    )
    return out


# ----------------------------------------------------------------------------------------------
# attnlab patterns -> geometry, and the call the dispatcher uses.
# ----------------------------------------------------------------------------------------------


def axes_for(pattern, n_q: int, n_kv: int) -> list[Axis] | None:
    """Per-axis bounds of an attnlab pattern, or None when its rule is not interval-separable.

    Covered: ``causal()``, every 1-D interval pattern (``sliding_window``, ``prefix_lm``,
    ``document``), grid patterns (``neighborhood``, ``blocked``) with dilation 1 on every axis, and
    ``a & b`` of covered patterns on the same axes (a product of intervals intersected with another
    is the product of the per-axis intersections).
    """
    from ..core.patterns import And, Causal
    from ..core.patterns.grid import GridPattern
    from ..core.patterns.intervals import IntervalPattern

    if isinstance(pattern, Causal):
        return [window_axis(n_q, n_kv, n_kv, 0)]
    if isinstance(pattern, And):
        a, b = axes_for(pattern.a, n_q, n_kv), axes_for(pattern.b, n_q, n_kv)
        if a is None or b is None or [(x.n_q, x.n_kv) for x in a] != [(y.n_q, y.n_kv) for y in b]:
            return None
        out = []
        for x, y in zip(a, b):
            lo = torch.maximum(x.lo, y.lo)
            out.append(Axis(x.n_q, x.n_kv, lo, torch.maximum(torch.minimum(x.hi, y.hi), lo)))
        return out
    if isinstance(pattern, IntervalPattern):
        lo, hi = pattern._tables(n_q, n_kv)  # inclusive, clamped to the keys; empty rows: hi < lo
        return [Axis(n_q, n_kv, lo.to(torch.int64), torch.maximum(hi + 1, lo).to(torch.int64))]
    if isinstance(pattern, GridPattern) and type(pattern).token_order is GridPattern.token_order:
        if any(d != 1 for d in pattern.dilations) or n_q != pattern.n_tokens or n_kv != pattern.n_tokens:
            return None
        axes = []
        for axis, size in enumerate(pattern.shape):
            lo, hi = pattern._tables(axis)  # (1, size) inclusive windows (dilation 1: one group)
            axes.append(Axis(size, size, lo[0].clamp(0, size), torch.maximum(hi[0] + 1, lo[0]).clamp(0, size)))
        return axes
    return None


def supports(pattern, n_q: int, n_kv: int) -> bool:
    """True when ``attention`` can run this pattern (see ``axes_for``)."""
    try:
        return axes_for(pattern, n_q, n_kv) is not None
    except ValueError:
        return False


@functools.lru_cache(maxsize=64)
def cached_plan(pattern, n_q: int, n_kv: int, q_tile, kv_tile, device: torch.device) -> Plan:
    """Plan per (pattern, lengths, tiles, device); patterns are frozen dataclasses, so equal ones share."""
    axes = axes_for(pattern, n_q, n_kv)
    if axes is None:
        raise ValueError(f"`pattern` is not interval-separable (dilation > 1 or unknown rule): {pattern!r}")
    grid_q = tuple(a.n_q for a in axes)
    grid_k = tuple(a.n_kv for a in axes)
    dq, dk = default_tiles(grid_q, grid_k)
    return build_plan(axes, q_tile or dq, kv_tile or dk, device)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern,
    *,
    scale: float | None = None,
    q_tile: tuple[int, ...] | None = None,
    kv_tile: tuple[int, ...] | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    options: dict | None = None,
) -> torch.Tensor:
    """Local attention of an attnlab pattern through the Triton kernel.

    Args:
        q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv), in the caller's (row-major) order.
        pattern: a pattern ``supports`` accepts.
        scale: multiplier of q k^T, default 1/sqrt(D).

    Other Parameters:
        q_tile, kv_tile: token-grid box per program / per key step (powers of two, one per axis);
            default 128 query and 64 key tokens (8x16 and 8x8 on 2-D grids).
        num_warps, num_stages: Triton launch options (default 8 warps, 3 stages).
        options: keyword options of ``local_attention`` (``late_l``, ``part_stages``, ...) and
            ``dense_core`` (True: the split of ``dense_core.py`` where it applies); default
            ``default_options(plan)``.

    Returns:
        (B, Hq, Nq, Dv) in q's dtype, same token order as q. Rows with no allowed key are zeros.
    """
    check_qkv(q, k, v)
    plan = cached_plan(pattern, q.shape[2], k.shape[2], q_tile, kv_tile, q.device)
    opts = dict(default_options(plan, num_warps) if options is None else options)
    if opts.pop("dense_core", False):
        from . import dense_core

        try:
            return dense_core.attention(q, k, v, pattern, scale=q.shape[-1] ** -0.5 if scale is None else scale,
                                        q_tile=plan.q_tile[:plan.ndim], kv_tile=plan.kv_tile[:plan.ndim],
                                        num_warps=num_warps, num_stages=num_stages, **opts)
        except NotImplementedError:
            pass  # no core, grouped heads, no dense kernel with a log-sum-exp: the plain kernel below
    return local_attention(q, k, v, plan, scale=scale, num_warps=num_warps, num_stages=num_stages, **opts)


def default_options(plan: Plan, num_warps: int | None = None) -> dict:
    """Kernel options measured to win on an H200 for this kind of plan (B=1, 16 heads, D=128, bf16;
    benchmarks/results/h200_triton_sweep_s5a.md and _s5b.md, two runs).

    - Tile-aligned plans (no partial tile: strided neighborhoods and HaloNet blocks on tile boundaries)
      drop the masked loop (``part_stages=0``): 2-D strided k=48 s=16 0.695 -> 0.661 ms (0.66 -> 0.69 of
      ideal), HaloNet block 16 halo 8 0.326 -> 0.292 ms (0.61 -> 0.69).
    - 1-D plans with masked tiles on 128 x 128 tiles and 8 warps (one program per multiprocessor) run a
      persistent grid whose item loop Triton flattens with the key loops (the next item's loads overlap
      this one's masked tiles and store), with the row sums folded in after p @ v: 1-D window N/16 at
      32K 1.290 -> 1.192-1.223 ms (0.69 -> 0.73-0.75). On 64 x 64 tiles (two programs per
      multiprocessor already) the persistent grid lost (HaloNet 0.36 -> 0.46 ms), so it stays off there.
    Everything else keeps the plain kernel.
    """
    warps = num_warps or (8 if math.prod(plan.q_tile) >= 128 else 4)
    if plan.tiles_full == plan.tiles_visited:
        return {"part_stages": 0}
    if plan.ndim == 1 and plan.q_tile[0] == 128 and plan.kv_tile[0] == 128 and warps == 8:
        return {"persistent": 1, "flatten": True, "late_l": True}
    return {}


def run_pattern(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern, scale: float) -> torch.Tensor:
    """The dispatcher's entry (``attnlab.attention(..., kernel="triton")`` and auto mode on CUDA where the
    Gluon kernel does not run the call): the dense-core split for long 1-D windows, else this kernel.
    Shapes as in ``attention``. Raises NotImplementedError, with the reason, for calls this kernel
    does not cover (no Triton, not CUDA, float64, head dim > 256, a pattern that is not
    interval-separable such as dilation > 1 or ``&``/``|`` compositions); the dispatcher then uses
    FlexAttention.
    """
    if q.device.type != "cuda":
        raise NotImplementedError(f"the Triton kernel runs on CUDA only; got device {q.device}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise NotImplementedError(f"the Triton kernel takes float16, bfloat16 or float32; got {q.dtype}")
    if max(q.shape[-1], v.shape[-1]) > 256:
        raise NotImplementedError(f"the Triton kernel takes head dims <= 256; got D={q.shape[-1]}, Dv={v.shape[-1]}")
    big = tile_head_dim(q, v)
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise NotImplementedError(f"Triton is not installed ({e})") from e
    route = None if pattern is None else _route(pattern, q.shape[2], k.shape[2], big, q.device)
    if route is None:
        raise NotImplementedError(f"pattern {pattern!r} is not interval-separable on this grid")
    q_tile, kv_tile, warps = route
    if len(q_tile) == 1 and big <= 128:
        from . import dense_core

        try:  # long 1-D windows: cuDNN for each tile's full run, this kernel for the edges
            return dense_core.run_pattern(q, k, v, pattern, scale)
        except NotImplementedError:
            pass
    return attention(q, k, v, pattern, scale=scale, q_tile=q_tile, kv_tile=kv_tile, num_warps=warps,
                     num_stages=3 if big <= 128 else 2)


def tile_head_dim(q: torch.Tensor, v: torch.Tensor) -> int:
    """The head dim that sizes this kernel's tiles: max(D, Dv), doubled for float32 (on-chip bytes per
    tile row scale with the element size)."""
    return max(q.shape[-1], v.shape[-1]) * q.element_size() // 2


@functools.lru_cache(maxsize=256)
def _route(pattern, n_q: int, n_kv: int, head_dim: int, device: torch.device) -> tuple[tuple, tuple, int] | None:
    """``choose_tiles`` for a covered call, None for an uncovered one. Cached: deriving the geometry
    costs ~1 ms of host time per call, more than the kernel itself at 8K tokens on an H200."""
    if not supports(pattern, n_q, n_kv):
        return None
    return choose_tiles(pattern, n_q, n_kv, head_dim, device)


def choose_tiles(pattern, n_q: int, n_kv: int, head_dim: int, device) -> tuple[tuple, tuple, int]:
    """Tile shapes and warps for a call: (q_tile, kv_tile, num_warps).

    1-D: 128 x 128 tiles, 8 warps. 2-D/3-D: 128 x 128 tiles (8x16 boxes) unless 64 x 64 boxes (8x8)
    cut the visited tiles by more than 15%, the measured cost of the smaller tiles on an H200
    (benchmarks/results/h200_kernels.md: 2-D k=33 and HaloNet blocks pick 8x8, strided k=48 picks 8x16).
    Head dims above 128 (or float32 inputs, passed as twice their head dim) halve both tiles to fit
    in shared memory.
    """
    axes = axes_for(pattern, n_q, n_kv)
    q_grid = tuple(a.n_q for a in axes)
    kv_grid = tuple(a.n_kv for a in axes)
    shrink = 1 if head_dim <= 128 else (2 if head_dim <= 256 else 4)
    big = (_box(q_grid, 128 // shrink), _box(kv_grid, 128 // shrink), max(4, 8 // shrink))
    if len(axes) == 1:
        return big
    small = (_box(q_grid, 64 // shrink), _box(kv_grid, 64 // shrink), 4)
    d_big = cached_plan(pattern, n_q, n_kv, big[0], big[1], device).block_density
    d_small = cached_plan(pattern, n_q, n_kv, small[0], small[1], device).block_density
    return small if d_small * 1.15 < d_big else big
