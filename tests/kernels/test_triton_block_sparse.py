"""attnlab's Triton block-sparse kernel (kernels/triton_block_sparse.py).

CPU tests check the tile lists (full / partial / skipped key tiles from a per-head layout, causal or
not) against the dense masks they stand for, and the argument checks; they need no Triton. Kernel
tests run against the float64 reference on random layouts and shapes: on CUDA (marked gpu), or on
CPU tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` is set and Triton is installed.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnlab import reference
from attnlab.core.patterns import block_sparse, causal, sliding_window
from attnlab.kernels import triton_block_sparse as tbs

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_kernel = pytest.mark.skipif(
    not (HAS_TRITON and (torch.cuda.is_available() or INTERPRET)), reason="needs Triton and CUDA (or TRITON_INTERPRET=1)"
)


def _dense_mask(layout: torch.Tensor, block: int, n_q: int, n_kv: int, is_causal: bool, hq: int) -> torch.Tensor:
    """(B|1, Hq, Nq, Nk) bool: the rule the kernel must apply, spelled out token by token."""
    i, j = torch.arange(n_q), torch.arange(n_kv)
    m = layout[:, :, i // block][:, :, :, j // block]
    m = m.repeat_interleave(hq // layout.shape[1], dim=1)
    if is_causal:
        m = m & (j[None, :] <= i[:, None] + n_kv - n_q)
    return m


def _random_layout(g, bl, hl, n_q, n_kv, block, density):
    return torch.rand(bl, hl, -(-n_q // block), -(-n_kv // block), generator=g) < density


@pytest.mark.parametrize(
    "n_q,n_kv,block,tiles,is_causal",
    [
        (40, 40, 8, (16, 16), True),
        (70, 33, 16, (32, 16), False),
        (100, 130, 64, (64, 64), True),
        (5, 300, 128, (16, 128), True),  # decode-like: few queries, long keys
        (130, 50, 24, (32, 32), True),  # Nq > Nk: the first rows see no key; cells cut tiles
        (256, 256, 128, (128, 64), True),
    ],
)
def test_tile_lists_match_mask(n_q, n_kv, block, tiles, is_causal):
    """Full tiles are all-allowed and inside the keys; no skipped tile holds an allowed pair; partial tiles hold
    one when layout cells do not cut tiles (else a set cell may lie wholly past the causal edge: wasted, not wrong)."""
    g = torch.Generator().manual_seed(n_q + n_kv)
    layout = _random_layout(g, 2, 3, n_q, n_kv, block, 0.4)
    plan = tbs.build_plan(layout, block, n_q, n_kv, causal=is_causal, q_tile=tiles[0], kv_tile=tiles[1])
    mask = _dense_mask(layout, block, n_q, n_kv, is_causal, 3)  # (2, 3, Nq, Nk)
    bm, bn = tiles
    n_qt, n_kt = -(-n_q // bm), -(-n_kv // bn)
    for r in range(2 * 3 * n_qt):
        b, h, t = r // (3 * n_qt), (r // n_qt) % 3, r % n_qt
        full = set(plan.full_idx[r, : plan.full_cnt[r]].tolist())
        part = set(plan.part_idx[r, : plan.part_cnt[r]].tolist())
        assert not full & part
        assert plan.full_idx[r, : plan.full_cnt[r]].tolist() == sorted(full)
        for j in range(n_kt):
            sub = mask[b, h, t * bm : (t + 1) * bm, j * bn : (j + 1) * bn]
            if j in full:
                assert sub.shape[1] == bn and bool(sub.all()), (r, j)
            elif j in part:
                assert plan.layout_mask or bool(sub.any()), (r, j)
            else:
                assert not bool(sub.any()), (r, j)


def test_block_multiple_of_tiles_needs_no_layout_lookup():
    """Blocks that are multiples of the tiles leave only causal/bound edges as partial tiles."""
    layout = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    plan = tbs.build_plan(layout, 128, 1024, 1024, causal=True, q_tile=128, kv_tile=64)
    assert not plan.layout_mask
    assert plan.part_cnt.tolist() == [2] * 8  # the causal edge cuts both key tiles of the diagonal block
    assert plan.full_cnt.tolist() == [2 * i for i in range(8)]
    assert tbs.build_plan(layout, 96, 768, 768, q_tile=64, kv_tile=64).layout_mask


def test_checks_name_the_argument():
    lay = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="block"):
        tbs.check_layout(lay, 0, 16, 16, 1, 2)
    with pytest.raises(ValueError, match="layout"):
        tbs.check_layout(lay.int(), 8, 16, 16, 1, 2)
    with pytest.raises(ValueError, match="cells"):
        tbs.check_layout(lay, 8, 17, 16, 1, 2)
    with pytest.raises(ValueError, match="head axis"):
        tbs.check_layout(torch.ones(3, 2, 2, dtype=torch.bool), 8, 16, 16, 1, 4)
    with pytest.raises(ValueError, match="batch axis"):
        tbs.check_layout(torch.ones(3, 1, 2, 2, dtype=torch.bool), 8, 16, 16, 2, 4)
    assert tbs.check_layout(lay, 8, 16, 16, 1, 2).shape == (1, 1, 2, 2)


def test_pattern_routing():
    lay = torch.tensor([[True, False], [True, True]])
    assert tbs.pattern_layout(block_sparse(lay, 4))[1:] == (4, False)
    assert tbs.pattern_layout(block_sparse(lay, 4) & causal())[1:] == (4, True)
    assert tbs.pattern_layout(causal() & block_sparse(lay, 4))[1:] == (4, True)
    assert tbs.pattern_layout(block_sparse(lay, 4) & sliding_window(3)) is None
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(NotImplementedError, match="CUDA"):
        tbs.run_pattern(q, q, q, block_sparse(lay, 4), 1.0)


# ---------------------------------------------------------------------------------------------
# The kernel against the float64 reference.
# ---------------------------------------------------------------------------------------------

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _check(b, hq, hkv, hl, bl, n_q, n_kv, d, dv, block, is_causal, density, dtype, seed, tol=None, **kw):
    if DEV == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton 3.6's interpreter multiplies bf16 tiles as raw bits (tl.dot), on any kernel")
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n_q, d, generator=g).to(DEV, dtype)
    k = torch.randn(b, hkv, n_kv, d, generator=g).to(DEV, dtype)
    v = torch.randn(b, hkv, n_kv, dv, generator=g).to(DEV, dtype)
    layout = _random_layout(g, bl, hl, n_q, n_kv, block, density)
    out = torch.full((b, hq, n_q, dv), float("nan"), device=DEV, dtype=dtype)  # poison: all must be written
    tbs.block_sparse_attention(q, k, v, layout.to(DEV), block, causal=is_causal, out=out, **kw)
    ref = reference.attention(q, k, v, mask=_dense_mask(layout, block, n_q, n_kv, is_causal, hq).to(DEV))
    assert torch.isfinite(out).all()
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < (tol or TOL[dtype]), err
    return out, ref


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "b,hq,hkv,hl,bl,n_q,n_kv,block,is_causal",
    [
        (1, 4, 2, 2, 1, 256, 256, 64, True),  # SeerAttention: one layout per GQA group, causal prefill
        (2, 4, 1, 4, 2, 200, 333, 32, False),  # per (batch, query head), Nq != Nk, ragged ends
        (1, 2, 2, 1, 1, 1, 300, 128, True),  # decode: one query against a long cache
        (2, 6, 2, 2, 1, 300, 140, 50, True),  # Nq > Nk: the first rows see nothing -> zeros
    ],
)
def test_kernel_matches_reference(b, hq, hkv, hl, bl, n_q, n_kv, block, is_causal, dtype):
    _check(b, hq, hkv, hl, bl, n_q, n_kv, 64, 64, block, is_causal, 0.4, dtype, seed=n_q)


EXAMPLES = int(os.environ.get("ATTNLAB_GPU_EXAMPLES", 25 if DEV == "cuda" else 6))  # each new shape compiles a kernel


@gpu
@needs_kernel
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    heads=st.sampled_from([(1, 1, 1), (4, 1, 1), (4, 2, 2), (6, 3, 6), (4, 2, 1)]),  # (Hq, Hkv, H_layout)
    dims=st.sampled_from([(32, 32), (64, 48), (80, 80), (128, 128)]),
    n_q=st.integers(1, 400),
    n_kv=st.integers(1, 400),
    block=st.sampled_from([16, 33, 64, 128]),
    is_causal=st.booleans(),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_kernel_random_layouts(heads, dims, n_q, n_kv, block, is_causal, density, dtype, seed):
    hq, hkv, hl = heads
    _check(2, hq, hkv, hl, 1, n_q, n_kv, dims[0], dims[1], block, is_causal, density, dtype, seed)


@gpu
@needs_kernel
def test_empty_layout_rows_are_zeros():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 32, generator=g).to(DEV, torch.bfloat16) for _ in range(3))
    layout = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    layout[0, 1, 2] = False  # head 1, query block 2 sees no key block
    out = tbs.block_sparse_attention(q, k, v, layout.to(DEV), 32, causal=True)
    assert torch.equal(out[0, 1, 64:96], torch.zeros_like(out[0, 1, 64:96]))
    assert bool((out[0, 0, 64:96] != 0).any())


@gpu
@needs_kernel
@pytest.mark.parametrize("use_tma", [False, True], ids=["ptr", "tma"])
@pytest.mark.parametrize("pipeline", [False, True], ids=["loop", "pipe"])
def test_kernel_tile_options(use_tma, pipeline):
    """Block 128 with 128x128 and 128x64 tiles (the benchmark's shapes), TMA loads and the hand-pipelined
    score loop on or off; also a layout with empty rows and one tile per row (the pipelined loop's edges)."""
    if use_tma and DEV != "cuda":
        pytest.skip("TMA needs CUDA")
    for tiles in ((128, 128), (128, 64)):
        _check(1, 4, 2, 2, 1, 1024, 1024, 128, 128, 128, True, 0.3, torch.float16, seed=3,
               q_tile=tiles[0], kv_tile=tiles[1], use_tma=use_tma, pipeline=pipeline)
    for density in (0.0, 0.05, 1.0):
        _check(1, 2, 1, 2, 1, 384, 512, 128, 64, 64, False, density, torch.float16, seed=4,
               q_tile=128, kv_tile=128, use_tma=use_tma, pipeline=pipeline)


@gpu
@needs_kernel
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the dispatcher routes to Triton on CUDA only")
def test_dispatch_uses_block_sparse_kernel():
    """attnlab.attention(kernel="triton") runs block_sparse & causal() on this kernel, exactly."""
    import attnlab

    g = torch.Generator().manual_seed(1)
    lay = torch.rand(9, 9, generator=g) < 0.5
    p = block_sparse(lay, 64) & causal()
    q, k, v = (torch.randn(1, 2, 576, 64, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
    out = attnlab.attention(q, k, v, pattern=p, kernel="triton")
    ref = reference.attention(q, k, v, pattern=p)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-2


@gpu
@needs_kernel
@pytest.mark.parametrize("method,k", [("window", 3), ("oracle_topk", 2)])
def test_seer_block_select_attend(method, k):
    """SeerAttention's BlockSelect runs its selection (B, Hkv, Qb, Kb) on this kernel, equal to the mask it simulates."""
    from attnlab.probes.base import CallContext
    from attnlab.sparse.seer_prefill import BlockSelect

    dtype = torch.bfloat16 if DEV == "cuda" else torch.float16  # the interpreter's bf16 dot is broken
    g = torch.Generator().manual_seed(7)
    n, block = 320, 64
    q = torch.randn(2, 6, n, 64, generator=g).to(DEV, dtype)
    key, v = (torch.randn(2, 2, n, 64, generator=g).to(DEV, dtype) for _ in range(2))
    ctx = CallContext(layer=0, n_layers=1, module=torch.nn.Identity(), n_q=n, n_kv=n,
                      q_positions=torch.arange(n, device=DEV), causal=True, key_padding=None, scaling=64 ** -0.5,
                      extra={}, input_ids=None)
    sel_mod = BlockSelect(method, block=block, k=k)
    out = sel_mod.attend(ctx, q, key, v)
    sel = sel_mod.selection(ctx, q, key).cpu()
    ref = reference.attention(q, key, v, mask=_dense_mask(sel, block, n, n, True, 6).to(DEV))
    assert ((out.double() - ref).norm() / ref.norm()).item() < TOL[dtype]


# Opt-in kernel options (measured on the H200 by benchmarks/h200_triton_sweep.py): each must give the same
# attention. 16-bit exponentials round p before the sum, so they get a looser tolerance.
OPTIONS = [
    dict(late_l=True),
    dict(part_stages=1, hints=True),
    dict(persistent=1),
    dict(persistent=1, flatten=True, late_l=True),
    dict(half_exp=True),
    dict(half_exp=True, late_l=True, part_stages=1),
]


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()))
def test_kernel_options_match_reference(opts, dtype):
    """Causal GQA layouts with diagonal partial tiles and a ragged end, and a noncausal Nq != Nk case with
    empty layout rows (persistent programs then walk several items each)."""
    tol = {torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype] if opts.get("half_exp") else None
    _check(1, 4, 2, 2, 1, 300, 300, 64, 64, 64, True, 0.4, dtype, seed=5, tol=tol, q_tile=64, kv_tile=64, **opts)
    _check(2, 2, 1, 1, 1, 200, 333, 64, 48, 32, False, 0.3, dtype, seed=6, tol=tol, q_tile=32, kv_tile=32, **opts)


def test_auto_part_stages_is_one_for_causal_plans_only(monkeypatch):
    """The default ("auto") masked-loop stages: 1 for causal plans (measured on the H200), the kernel's own
    stages otherwise. Checked on the launch arguments, so it needs no GPU."""
    seen = {}

    class Launch:
        def __getitem__(self, grid):
            return lambda *a, **kw: seen.update(kw)

    monkeypatch.setattr(tbs, "_kernel", lambda: Launch())
    q = torch.randn(1, 2, 128, 32)
    lay = torch.ones(2, 2, dtype=torch.bool)
    for is_causal, want in ((True, 1), (False, None)):
        tbs.block_sparse_attention(q, q, q, lay, 64, causal=is_causal)
        assert seen["PART_STAGES"] == want
    tbs.block_sparse_attention(q, q, q, lay, 64, causal=True, part_stages=None)
    assert seen["PART_STAGES"] is None
    # causal prefill at block 128: 128 x 64 tiles, 4 warps, 2 stages (two programs per multiprocessor)
    q = torch.randn(1, 2, 256, 64, dtype=torch.float16)
    lay = torch.ones(2, 2, dtype=torch.bool)
    tbs.block_sparse_attention(q, q, q, lay, 128, causal=True)
    assert (seen["BLOCK_M"], seen["BLOCK_N"], seen["num_warps"], seen["num_stages"]) == (128, 64, 4, 2)
    tbs.block_sparse_attention(q, q, q, lay, 128, causal=False)
    assert (seen["BLOCK_M"], seen["BLOCK_N"], seen["num_warps"], seen["num_stages"]) == (128, 128, 8, 3)
    assert tbs.default_tiles(128, 1, 64, 2, causal=True)[:2] == (16, 128)  # decode keeps its short tiles
