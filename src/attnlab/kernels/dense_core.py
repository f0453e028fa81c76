"""1-D local attention split in two: a dense core for cuDNN, the window's edges for the Triton kernel.

In a 1-D sliding window every 128-query tile sees one run of keys in full (the intersection of its
rows' windows: ~94% of the work for a window of 2048) and two thin triangles at the ends. The
Triton local kernel (``triton_local.py``) runs every key tile at ~0.78 of cuDNN's speed; here the
full run of each tile goes to PyTorch's cuDNN attention instead (flash on other GPUs), as one call
with the tiles folded onto the batch axis: queries and key runs are overlapping ``as_strided``
views (``grouped_dense.fold``), nothing is copied. cuDNN returns the output and the log-sum-exp of
each row; the Triton kernel starts each tile's online softmax from them (``init``) and adds only the
masked edge tiles, so the two parts merge inside the kernel with no extra pass.

Exact (the split changes the order of the sums, not what is summed): tested against the float64
reference. Applies when the plan's mask-free key tiles form one evenly spaced run per query tile
over a stretch of tiles (``core``), heads are not grouped (Hq == Hkv; cuDNN takes no GQA here), B and
H fold into one stride, and a dense kernel with a log-sum-exp output exists for the dtype (cuDNN or
flash on CUDA: float16/bfloat16; PyTorch's CPU flash kernel under ``TRITON_INTERPRET=1``). Other
calls raise NotImplementedError and the caller keeps the plain kernel. The edge pass may use smaller
tiles than the 128-row core groups (each tile starts from its own rows of its group).

Measured on an H200 (benchmarks/results/h200_dense_core_s6d.md, the confirm run; sweeps s6a-c; B=1,
16 heads, D=128, bf16): 1-D window N/16 at 32K, the core alone 0.86 ms (0.97 of cuDNN's dense rate), but
the edge pass costs 0.34 ms although it does 1/8 of the work: with a few key tiles per program its time
is loads, the start-up of each program and the store, not math. Split 1.19-1.20 ms = 0.74 of the ideal
vs 1.24 ms (0.71) for the plain kernel in the same run; causal window 2048 0.74 vs 0.71; window 4096 at
32K 0.81 vs 0.78; window 1024 at 16K 0.61 vs 0.58. The issue's 0.75 is not reached. Edge tiles of 64 x 32
beat 128 x 128 (0.42 ms) and 64 x 64 (0.36 ms); a persistent grid and launching the long tiles first
did not help.

Giving cuDNN the edges too failed (benchmarks/results/h200_core_probes_s6.md): a band bias over each
tile's whole union halves cuDNN's rate (1.65 ms), and its ``is_causal`` is top-left, so the right edge
cannot ride on the core as a bottom-right causal mask (flash can, at 1.57 ms for the core alone).

On a Hopper GPU with Gluon the dispatcher now runs 1-D windows through the warp-specialized Gluon kernel
instead (``gluon_local.py``: the whole window at cuDNN's rate, edges masked; N/16 at 32K 0.80 of the ideal,
benchmarks/results/h200_gluon_s7.md); this split remains the route on other CUDA GPUs.

The idea of handing a window's full blocks to a dense kernel and only its diagonal blocks to a
masked one is the split FlashAttention-2's local attention and NATTEN's fused kernels make inside
one kernel; here the two halves are two kernels, because cuDNN's dense core is faster than ours.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from . import triton_local as _tl
from .grouped_dense import fold, foldable

MIN_CORE_KEYS = 256  # a shorter run of full keys per tile is not worth a second kernel launch
ROUTE_MIN_KEYS = 896  # auto mode splits from here: measured wins at runs of 896 to 3968 keys (H200); shorter: untried
EDGE = dict(q_tile=(64,), kv_tile=(32,), num_warps=4, num_stages=3, hints=True)  # edge pass, measured best


@dataclass(frozen=True)
class Core:
    """Query tiles ``first .. first+count-1`` (``q_tile`` rows each) see keys ``k_start + i*k_step + [0, k_len)``
    in full: those pairs go to the dense kernel."""

    first: int
    count: int
    q_tile: int
    k_start: int
    k_step: int
    k_len: int


def core(plan: _tl.Plan) -> Core | None:
    """The longest stretch of consecutive query tiles whose mask-free key tiles are runs of one length
    at evenly spaced starts (1-D plans; None if there is none of at least MIN_CORE_KEYS keys)."""
    if plan.ndim != 1:
        return None
    qt, kt = plan.q_tile[0], plan.kv_tile[0]
    box = plan.fbox.cpu()
    start, length = (box[:, 0] * kt).tolist(), (box[:, 3] * kt).tolist()
    n = plan.q_grid[0] // qt  # whole query tiles only: the views must not run past the tensor
    best, a = (0, 0), 0
    for t in range(1, n + 1):
        same = t < n and length[t] == length[a] and (t == a + 1 or start[t] - start[t - 1] == start[a + 1] - start[a])
        if not same:
            if length[a] >= MIN_CORE_KEYS and t - a > best[1]:
                best = (a, t - a)
            a = t
    first, count = best
    if count < 2:
        return None
    return Core(first, count, qt, start[first], start[first + 1] - start[first], length[first])


CORE_TILE = 128  # query rows per dense group and key alignment of its run: cuDNN's own tile height


@functools.lru_cache(maxsize=64)
def cached_split(pattern, n_q: int, n_kv: int, q_tile, kv_tile, device: torch.device, longest_first: bool = True):
    """(edge plan, Core, init index) for a pattern on the Triton kernel's tiles, or None without a core.

    The core is found on 128 x 128 tiles (``CORE_TILE``); the edge plan keeps, for each of its query
    tiles inside a core group, every key tile it visits except those of the group's run: the rest of
    its mask-free tiles as its full box when they are one run, else in the masked list (exact either
    way). q_tile and kv_tile must divide 128. Init index (n_q_tiles, 2) int32: the tile's group and
    first row in it, group -1 outside the core. ``longest_first``: the edge plan launches the tiles
    with the most key tiles first (``Plan.order``); False: in turn.
    """
    qt, kt = q_tile[0], kv_tile[0]
    if CORE_TILE % qt or CORE_TILE % kt:
        raise ValueError(f"edge tiles must divide {CORE_TILE}; got {q_tile=}, {kv_tile=}")
    c = core(_tl.cached_plan(pattern, n_q, n_kv, (CORE_TILE,), (CORE_TILE,), torch.device("cpu")))
    if c is None:
        return None
    plan = _tl.cached_plan(pattern, n_q, n_kv, (qt,), (kt,), torch.device("cpu"))
    n_t = plan.fbox.shape[0]
    idx = torch.full((n_t, 2), -1, dtype=torch.int32)
    fbox = plan.fbox.clone()
    full, part = [], []
    for t in range(n_t):
        f0, e0 = int(fbox[t, 0]), int(fbox[t, 3])
        f_list = list(range(f0, f0 + e0))
        p_list = plan.part_idx[t, :int(plan.part_cnt[t])].tolist()
        g = t * qt // CORE_TILE - c.first
        if 0 <= g < c.count:
            idx[t] = torch.tensor([g, t * qt % CORE_TILE], dtype=torch.int32)
            k0 = c.k_start + g * c.k_step
            in_core = range(k0 // kt, (k0 + c.k_len) // kt)
            f_list = [j for j in f_list if j not in in_core]
            p_list = [j for j in p_list if j not in in_core]
            if f_list and f_list != list(range(f_list[0], f_list[0] + len(f_list))):
                p_list, f_list = p_list + f_list, []  # two runs: no box, so masked
            fbox[t, 0], fbox[t, 3] = (f_list[0] if f_list else 0), len(f_list)
        full.append(f_list)
        part.append(p_list)

    def pack(lists):
        width = max(1, max(len(x) for x in lists))
        out = torch.zeros(n_t, width, dtype=torch.int32)
        for t, x in enumerate(lists):
            out[t, :len(x)] = torch.tensor(x, dtype=torch.int32)
        return out.to(device), torch.tensor([len(x) for x in lists], dtype=torch.int32, device=device)

    full_idx, full_cnt = pack(full)
    part_idx, part_cnt = pack(part)
    n_full, n_part = sum(map(len, full)), sum(map(len, part))
    # Tiles outside the core (the window's ends) visit many more key tiles than the edge tiles:
    # launched first, they do not stretch the last wave.
    work = torch.tensor([len(f) + len(p) for f, p in zip(full, part)])
    order = torch.argsort(-work, stable=True).to(torch.int32)
    edge = dataclasses.replace(plan, bounds=[b.to(device) for b in plan.bounds], fbox=fbox.to(device),
                               full_idx=full_idx, full_cnt=full_cnt, part_idx=part_idx, part_cnt=part_cnt,
                               tiles_full=n_full, tiles_visited=n_full + n_part,
                               order=order.to(device) if longest_first else None)
    return edge, c, idx.to(device)


def dense_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention and its row log-sum-exp from PyTorch's own kernels.

    q (G, H, L, D), k/v (G, H, M, D) (any strides with a unit last one). Returns out (G, H, L, Dv) and
    lse (G, H, L) float32 (natural log of the scaled scores' exp-sum). Raises NotImplementedError when
    no such kernel takes the call.
    """
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise NotImplementedError(f"no dense CUDA kernel with a log-sum-exp for {q.dtype}")
    errors = []
    for op in (_cudnn, _flash):
        try:
            out, lse = op(q, k, v, scale)
            return out, lse.reshape(q.shape[:3]) if lse.dim() != 3 else lse
        except RuntimeError as e:  # backend not built, shape or stride not supported
            errors.append(f"{op.__name__}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    raise NotImplementedError("; ".join(errors))


def _cudnn(q, k, v, scale):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)[:2]


def _flash(q, k, v, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern, *, scale: float,
              q_tile: tuple[int, ...], kv_tile: tuple[int, ...], num_warps: int | None = None,
              num_stages: int | None = None, longest_first: bool = True, **options) -> torch.Tensor:
    """Local attention of a 1-D pattern as dense core (cuDNN) + edges (Triton kernel).

    Args:
        q: (B, H, Nq, D), k: (B, H, Nk, D), v: (B, H, Nk, Dv); a pattern ``triton_local.supports``.
        scale: multiplier of q k^T. q_tile, kv_tile: the edge pass's tiles, dividing the core's 128-row
            groups (``CORE_TILE``). longest_first: see ``cached_split``.
        options: the Triton kernel's options for the edge pass (``local_attention``).

    Returns:
        (B, H, Nq, Dv) in q's dtype. Raises NotImplementedError when the split does not apply (see
        the module docstring); the result is then the caller's to compute another way.
    """
    if q.shape[1] != k.shape[1]:
        raise NotImplementedError(f"the dense core needs Hq == Hkv; got {q.shape[1]} and {k.shape[1]}")
    if not all(foldable(t) for t in (q, k, v)):
        raise NotImplementedError("the dense core needs B and H foldable into one stride")
    split = cached_split(pattern, q.shape[2], k.shape[2], q_tile, kv_tile, q.device, longest_first)
    if split is None:
        raise NotImplementedError(f"pattern {pattern!r} has no run of full key tiles to split off")
    edge, c, idx = split
    qv = fold(q, c.first * c.q_tile, c.q_tile, c.count, c.q_tile)
    kv = fold(k, c.k_start, c.k_step, c.count, c.k_len)
    vv = fold(v, c.k_start, c.k_step, c.count, c.k_len)
    o0, lse0 = dense_with_lse(qv, kv, vv, scale)
    return _tl.local_attention(q, k, v, edge, scale=scale, num_warps=num_warps, num_stages=num_stages,
                               init=(idx, o0, lse0), **options)


def run_pattern(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern, scale: float) -> torch.Tensor:
    """The dispatcher's entry (CUDA auto mode, before the plain Triton kernel): the split with the edge
    pass measured best on an H200 (``EDGE``), for 1-D patterns whose core runs hold >= ROUTE_MIN_KEYS
    keys. Shapes as in ``attention``; NotImplementedError (the caller runs the plain kernel) otherwise.
    The caller has checked that the pattern is interval-separable (``triton_local.supports``)."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        raise NotImplementedError("the dense core runs float16/bfloat16 on CUDA")
    split = cached_split(pattern, q.shape[2], k.shape[2], EDGE["q_tile"], EDGE["kv_tile"], q.device)
    if split is None or split[1].k_len < ROUTE_MIN_KEYS:
        raise NotImplementedError("no core run long enough to pay for the split")
    return attention(q, k, v, pattern, scale=scale, **EDGE)
