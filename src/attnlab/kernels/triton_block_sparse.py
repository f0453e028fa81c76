"""attnlab's Triton kernel for block-sparse attention from a per-(batch, head) block layout.

A flash-attention forward (online softmax, bf16/fp16 tiles, fp32 accumulation) in which every query
tile walks an explicit list of key tiles, CSR-style: per (batch, head, query tile) a count and a row of
key-tile ids, split into mask-free tiles and tiles that need the element rule (a causal edge, the end
of the keys, or a layout cell boundary inside the tile). This is the layout that
"SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs" (Gao et al., 2024) selects per head
and runs with its block-sparse FlashAttention kernel; the lists are the same idea as FlexAttention's
``BlockMask`` (kv_num_blocks / kv_indices), built here straight from the layout on the device.

Rule: query i may attend key j iff ``layout[b, h, i // block, j // block]`` and, with ``causal=True``,
``j <= i + (Nk - Nq)`` (bottom-right aligned, as attnlab's ``causal()``). Rows with no allowed key are
zeros. The layout's head axis may be 1 (shared), Hkv (one per GQA group, as SeerAttention's gates
give) or Hq; in general query head h reads layout head ``h // (Hq // H_layout)``.

Shapes: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), Hq % Hkv == 0; layout bool
(B|1, H_layout, ceil(Nq / block), ceil(Nk / block)). CUDA only (Triton); with ``TRITON_INTERPRET=1``
it also runs on CPU tensors (slowly: for tests).

Measured on an H200 (benchmarks/results/seer_h200_triton.md; B=1, 16 heads, D=128, bf16, N=32K, block 128,
causal per-head layouts): 1.08 ms at 90% sparsity, 0.67 of the ideal speed-up over cuDNN's causal SDPA
(FlexAttention 0.61 in the same run), 0.73 at 80%; with every tile full it runs at 0.71 of cuDNN.
Session 5 (benchmarks/results/h200_triton_sweep_s5a.md, _s5b.md): causal prefill now defaults to 128 x 64
tiles, 4 warps, 2 stages and an unpipelined diagonal loop: 1.043-1.046 ms at 90% sparsity, 0.74 of ideal
(session 4's launch 1.073-1.091 ms, 0.71-0.72 in the same runs); confirm run 1.045 ms, 0.73 (old 1.083,
0.70; FlexAttention 0.64), benchmarks/results/h200_triton_confirm_s5.md.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..core.checks import check_qkv
from .triton_local import _half_exp_mode, _set_allocator  # shared by both kernels

LOG2E = 1.4426950408889634


@dataclass
class BlockPlan:
    """Tile lists for one layout, lengths and tile shape (build with ``build_plan``; reusable across calls).

    Lists are rows ``b * Hl * Qt + h * Qt + t`` (b only when the layout has a batch axis): ``full_idx``
    (R, full_w) int32 ascending key-tile ids whose every pair is allowed, ``full_cnt`` (R,) int32 how
    many are valid, and ``part_idx`` / ``part_cnt`` the tiles that need the element rule.
    """

    n_q: int
    n_kv: int
    block: int
    causal: bool
    q_tile: int
    kv_tile: int
    layout: torch.Tensor  # (Bl, Hl, Qb, Kb) int8, for the element rule inside partial tiles
    full_idx: torch.Tensor
    full_cnt: torch.Tensor
    part_idx: torch.Tensor
    part_cnt: torch.Tensor

    @property
    def n_q_tiles(self) -> int:
        return -(-self.n_q // self.q_tile)

    @property
    def n_kv_tiles(self) -> int:
        return -(-self.n_kv // self.kv_tile)

    @property
    def layout_mask(self) -> bool:
        """True when layout cells cut through kernel tiles (block not a multiple of the tiles)."""
        return self.block % self.q_tile != 0 or self.block % self.kv_tile != 0

    def block_density(self) -> float:
        """Fraction of (query tile, key tile) pairs visited, over all layout rows (one sync)."""
        visited = (self.full_cnt.sum() + self.part_cnt.sum()).item()
        return visited / (self.full_cnt.numel() * self.n_kv_tiles)


def check_layout(layout: torch.Tensor, block: int, n_q: int, n_kv: int, batch: int, heads: int) -> torch.Tensor:
    """The layout as bool (B|1, Hl, Qb, Kb); raises ValueError naming what is wrong.

    Accepts (Qb, Kb), (Hl, Qb, Kb) or (B|1, Hl, Qb, Kb); ``heads`` (Hq) must be a multiple of Hl.
    """
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"`block` must be a positive int (tokens per layout cell); got {block=}")
    if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool or not 2 <= layout.dim() <= 4:
        raise ValueError(
            "`layout` must be a bool tensor (Qb, Kb), (H, Qb, Kb) or (B, H, Qb, Kb); got "
            f"{type(layout).__name__} {getattr(layout, 'dtype', None)} of shape {tuple(getattr(layout, 'shape', ()))}"
        )
    while layout.dim() < 4:
        layout = layout.unsqueeze(0)
    need = (-(-n_q // block), -(-n_kv // block))
    if tuple(layout.shape[2:]) != need:
        raise ValueError(f"`layout` has {tuple(layout.shape[2:])} cells but {n_q=}, {n_kv=} with {block=} need {need}")
    if layout.shape[0] not in (1, batch):
        raise ValueError(f"`layout` batch axis must be 1 or B={batch}; got {layout.shape[0]}")
    if layout.shape[1] < 1 or heads % layout.shape[1]:
        raise ValueError(f"`layout` head axis ({layout.shape[1]}) must divide the query heads Hq={heads}")
    return layout


def _tile_sets(layout: torch.Tensor, block: int, n_q: int, n_kv: int, causal: bool, bm: int, bn: int):
    """(full, partial) bool (Bl, Hl, Qt, Kt) for kernel tiles of bm queries x bn keys.

    A tile is visited when some layout cell it overlaps is set (and, causal, some pair is on the
    visible side); it is full when every overlapped cell is set, the causal edge misses it and it ends
    inside the keys. 2-D prefix sums count set cells per tile rectangle, so no (Nq, Nk) work is done.
    """
    bl, hl, qb, kb = layout.shape
    dev = layout.device
    counts = torch.zeros(bl, hl, qb + 1, kb + 1, dtype=torch.int32, device=dev)
    counts[:, :, 1:, 1:] = layout.to(torch.int32).cumsum(2).cumsum(3)
    q0 = torch.arange(0, n_q, bm, device=dev)
    q1 = torch.clamp(q0 + bm, max=n_q)
    k0 = torch.arange(0, n_kv, bn, device=dev)
    k1 = torch.clamp(k0 + bn, max=n_kv)
    r0, r1 = q0 // block, (q1 - 1) // block + 1
    c0, c1 = k0 // block, (k1 - 1) // block + 1

    def rect(r, c):
        return counts[:, :, r[:, None], c[None, :]]  # (Bl, Hl, Qt, Kt)

    set_cells = rect(r1, c1) - rect(r0, c1) - rect(r1, c0) + rect(r0, c0)
    visit = set_cells > 0
    full = set_cells == (r1 - r0)[:, None] * (c1 - c0)[None, :]
    if causal:
        off = n_kv - n_q
        visit = visit & (k0[None, :] <= (q1 - 1)[:, None] + off)
        full = full & ((k1 - 1)[None, :] <= q0[:, None] + off)
    full = full & visit & (k0 + bn <= n_kv)[None, :]
    return full, visit & ~full


def _pack(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Bl, Hl, Qt, Kt) bool -> ids (R, W) int32 ascending (selected first), counts (R,) int32; W = max count."""
    kt = sel.shape[-1]
    sel = sel.reshape(-1, kt)
    cnt = sel.sum(-1, dtype=torch.int32)
    ids = torch.where(sel, torch.arange(kt, device=sel.device, dtype=torch.int32), kt).sort(-1).values
    width = max(int(cnt.max()), 1) if cnt.numel() else 1  # one sync; keeps the lists as short as the densest row
    return ids[:, :width].to(torch.int32).contiguous(), cnt.contiguous()


def build_plan(layout: torch.Tensor, block: int, n_q: int, n_kv: int, *, causal: bool = False,
               q_tile: int = 128, kv_tile: int = 128) -> BlockPlan:
    """Tile lists for a layout already checked by ``check_layout`` (4-D bool, on the kernel's device)."""
    full, part = _tile_sets(layout, block, n_q, n_kv, causal, q_tile, kv_tile)
    full_idx, full_cnt = _pack(full)
    part_idx, part_cnt = _pack(part)
    return BlockPlan(n_q, n_kv, block, causal, q_tile, kv_tile, layout.to(torch.int8).contiguous(),
                     full_idx, full_cnt, part_idx, part_cnt)


def default_tiles(block: int, n_q: int, head_dim: int, elem_size: int, causal: bool = False) -> tuple[int, int, int, int]:
    """(q_tile, kv_tile, num_warps, num_stages) for a call.

    128 x 128 tiles, 8 warps, 3 stages when the block is a multiple of 128 (the shape measured best on
    an H200 for the local kernel, benchmarks/results/h200_notes.md); 64 x 64, 4 warps for blocks that
    are multiples of 64 only, and for any other block (cells then cut tiles and partial tiles look the
    layout up per element). Head dims past 128 (float32 counts double) halve the tiles for shared memory.
    Causal calls with 128-query tiles (prefill) take 128 x 64 tiles, 4 warps, 2 stages instead: two
    one-warpgroup programs share a multiprocessor (96 KB of shared memory each), so one's softmax runs
    beside the other's products; with the unpipelined diagonal loop (``part_stages="auto"``) SeerAttention
    layouts at 90% sparsity, N=32K, D=128 bf16 ran 1.043-1.046 ms vs 1.073-1.091 ms for 128 x 128 x 8
    warps in two H200 runs (benchmarks/results/h200_triton_sweep_s5a.md, _s5b.md).
    """
    big = head_dim * elem_size // 2
    shrink = 1 if big <= 128 else (2 if big <= 256 else 4)
    tile = 128 if (block % 128 == 0) else 64
    tile = max(16, tile // shrink)
    q_tile = min(tile, max(16, 1 << max(0, (n_q - 1).bit_length())))  # short queries (decode): fewer idle rows
    if causal and q_tile == 128 and tile == 128:
        return 128, 64, 4, 2
    return q_tile, tile, 8 if q_tile >= 128 else 4, 3 if big <= 128 else 2


@functools.lru_cache(maxsize=None)
def _kernel():
    from .triton_block_sparse_kernel import block_sparse_fwd

    return block_sparse_fwd


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor | None,
    block: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    plan: BlockPlan | None = None,
    q_tile: int | None = None,
    kv_tile: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_tma: bool = False,
    pipeline: bool = False,
    maxnreg: int | None = None,
    late_l: bool = False,
    part_stages: int | None | str = "auto",
    hints: bool = False,
    persistent: int = 0,
    flatten: bool = False,
    half_exp: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse attention: query i sees key j iff its layout cell is set (and, causal, j <= i + Nk - Nq).

    Args:
        q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv); float16, bfloat16 or float32.
        layout: bool (Qb, Kb), (Hl, Qb, Kb) or (B|1, Hl, Qb, Kb) with Qb = ceil(Nq / block),
            Kb = ceil(Nk / block); query head h reads layout head h // (Hq // Hl). May be None when
            ``plan`` is given.
        block: tokens per layout cell along both axes.
        causal: also apply the bottom-right aligned causal rule (diagonal cells become partial tiles).
        scale: multiplier of q k^T, default 1/sqrt(D).

    Other Parameters:
        plan: tile lists from ``build_plan`` to reuse (layout, block, causal and tiles are then its own).
        q_tile, kv_tile, num_warps, num_stages: kernel shape, default ``default_tiles``.
        use_tma: load key/value tiles with Hopper's tensor-memory copies (full power-of-two head dims).
        pipeline: issue the next mask-free tile's q k^T before this tile's softmax (software-pipelined
            by hand, as FlashAttention-3 overlaps them; costs a second score tile of registers).
        maxnreg: cap on registers per thread (Triton launch option), e.g. 128 so that two programs of
            small tiles share a multiprocessor and one's softmax overlaps the other's matrix products.
        late_l: fold each tile's row sums into l after the p @ v product (Triton tutorial order).
        part_stages: software-pipeline stages of the masked-tile loop only (1 = not pipelined, None = the
            kernel's ``num_stages``). "auto": 1 for causal plans, whose masked loop is mostly the one
            diagonal tile per row (H200, SeerAttention layouts at 90% sparsity, N=32K: 1.073 -> 1.043 ms,
            0.718 -> 0.739 of ideal, benchmarks/results/h200_triton_sweep_s5a.md), else None.
        hints: ``tl.assume`` the host's guarantees (positive strides and counts) to the compiler.
        persistent: > 0 launches that many programs per multiprocessor, each walking (query tile,
            batch x head) items in turn (CUDA; under the interpreter a third of the items).
        flatten: with ``persistent``, flatten the item loop with the key loops (``tl.range(flatten=True)``).
        half_exp: exponentials in 16 bits (``ex2.approx`` on bf16x2 / f16x2 pairs; float16/bfloat16
            inputs only): p is rounded to 16 bits for p @ v anyway; small extra error in p.
        out: (B, Hq, Nq, Dv) tensor to write into.
        Every option gives the same result; they exist to be measured (benchmarks/h200_triton_sweep.py).

    Returns:
        (B, Hq, Nq, Dv) in q's dtype. Rows with no allowed key are zeros.
    """
    check_qkv(q, k, v)
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"`q.dtype` must be float16, bfloat16 or float32 for the Triton kernel; got {q.dtype}")
    dq, dk, dw, ds = default_tiles(block if plan is None else plan.block, Nq, max(D, Dv), q.element_size(),
                                   causal if plan is None else plan.causal)
    if plan is None:
        layout = check_layout(layout, block, Nq, Nk, B, Hq).to(q.device)
        plan = build_plan(layout, block, Nq, Nk, causal=causal, q_tile=q_tile or dq, kv_tile=kv_tile or dk)
    elif (plan.n_q, plan.n_kv) != (Nq, Nk) or plan.layout.shape[0] not in (1, B) or Hq % plan.layout.shape[1]:
        raise ValueError(f"`plan` was built for n_q={plan.n_q}, n_kv={plan.n_kv}, layout {tuple(plan.layout.shape)}; "
                         f"got {Nq=}, {Nk=}, B={B}, Hq={Hq}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if out is None:
        out = torch.empty(B, Hq, Nq, Dv, dtype=q.dtype, device=q.device)
    scale = D ** -0.5 if scale is None else float(scale)
    bl, hl, qb, kb = plan.layout.shape
    block_d, block_dv = max(16, 1 << (D - 1).bit_length()), max(16, 1 << (Dv - 1).bit_length())
    if use_tma:
        size = q.element_size()
        use_tma = (block_d == D and block_dv == Dv and q.device.type == "cuda"
                   and all(t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s in t.stride()[:3]) for t in (k, v)))
        if use_tma:
            _set_allocator()
    if part_stages == "auto":
        part_stages = 1 if plan.causal else None
    # Launch shape: default_tiles' when the plan has its tiles, else 8 warps for 128-row tiles and the
    # non-causal rule's stages.
    if (plan.q_tile, plan.kv_tile) == (dq, dk):
        warps, stages = dw, ds
    else:
        warps = 8 if plan.q_tile >= 128 else 4
        stages = default_tiles(plan.block, Nq, max(D, Dv), q.element_size())[3]
    n_qt = plan.n_q_tiles
    launch = {} if maxnreg is None else {"maxnreg": maxnreg}
    grid = (n_qt, B * Hq)
    if persistent:
        n_work = n_qt * B * Hq
        progs = (torch.cuda.get_device_properties(q.device).multi_processor_count * persistent
                 if q.device.type == "cuda" else max(1, n_work // 3))
        grid = (min(n_work, progs), 1)
    _kernel()[grid](
        q, k, v, out,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        plan.full_idx, plan.full_cnt, plan.part_idx, plan.part_cnt, plan.layout,
        hl * n_qt if bl > 1 else 0, hl * qb * kb if bl > 1 else 0, qb * kb, Hq // hl,
        n_qt, plan.full_idx.shape[1], plan.part_idx.shape[1], qb, kb, plan.block,
        scale * LOG2E, Hq, Hq // Hkv, Nq, Nk, Nk - Nq, B,
        BLOCK_M=plan.q_tile, BLOCK_N=plan.kv_tile, D=D, DV=Dv, BLOCK_D=block_d, BLOCK_DV=block_dv,
        CAUSAL=plan.causal, LAYOUT_MASK=plan.layout_mask, EVEN_Q=Nq % plan.q_tile == 0,
        IEEE=q.dtype == torch.float32, REVERSE=plan.causal, USE_TMA=use_tma, PIPE=pipeline,
        LATE_L=late_l, PART_STAGES=part_stages, HINTS=hints, PERSIST=bool(persistent),
        FLATTEN=flatten and bool(persistent),
        HALF_EXP=_half_exp_mode(half_exp, q),
        num_warps=num_warps or warps, num_stages=num_stages or stages, **launch,
    )
    return out


# ----------------------------------------------------------------------------------------------
# attnlab patterns: block_sparse(layout, block) and block_sparse(...) & causal().
# ----------------------------------------------------------------------------------------------


def pattern_layout(pattern) -> tuple | None:
    """(layout (Qb, Kb) bool, block, causal) for ``block_sparse`` or ``block_sparse & causal()``, else None."""
    from ..core.patterns import And, BlockSparse, Causal

    if isinstance(pattern, BlockSparse):
        return pattern.layout, pattern.block_size, False
    if isinstance(pattern, And):
        for a, b in ((pattern.a, pattern.b), (pattern.b, pattern.a)):
            if isinstance(a, BlockSparse) and isinstance(b, Causal):
                return a.layout, a.block_size, True
    return None


def supports(pattern) -> bool:
    return pattern_layout(pattern) is not None


@functools.lru_cache(maxsize=64)
def _pattern_plan(pattern, n_q: int, n_kv: int, head_dim: int, elem_size: int, batch: int, heads: int,
                  device: torch.device) -> BlockPlan:
    """Plan per (pattern, lengths, head dim, device): patterns are frozen dataclasses, so equal ones share."""
    layout, block, causal = pattern_layout(pattern)
    qt, kt, _, _ = default_tiles(block, n_q, head_dim, elem_size, causal)
    layout = check_layout(layout, block, n_q, n_kv, batch, heads).to(device)
    return build_plan(layout, block, n_q, n_kv, causal=causal, q_tile=qt, kv_tile=kt)


def run_pattern(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern, scale: float) -> torch.Tensor:
    """The dispatcher's entry for ``block_sparse`` patterns on CUDA; NotImplementedError (with the reason)
    for calls it does not cover, so the dispatcher can fall back to FlexAttention."""
    if q.device.type != "cuda":
        raise NotImplementedError(f"the Triton kernel runs on CUDA only; got device {q.device}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise NotImplementedError(f"the Triton kernel takes float16, bfloat16 or float32; got {q.dtype}")
    if max(q.shape[-1], v.shape[-1]) > 256:
        raise NotImplementedError(f"the Triton kernel takes head dims <= 256; got D={q.shape[-1]}, Dv={v.shape[-1]}")
    if not supports(pattern):
        raise NotImplementedError(f"pattern {pattern!r} is not block_sparse (or block_sparse & causal)")
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise NotImplementedError(f"Triton is not installed ({e})") from e
    plan = _pattern_plan(pattern, q.shape[2], k.shape[2], max(q.shape[-1], v.shape[-1]), q.element_size(),
                         1, 1, q.device)
    return block_sparse_attention(q, k, v, None, plan.block, plan=plan, scale=scale)
