"""The dense-core split of 1-D local attention (kernels/dense_core.py).

CPU tests check the split's geometry without Triton: the core's key runs are seen in full by every
query of their tile, and core + edge plan cover the pattern's mask exactly once. Kernel tests run the
split against the float64 reference (CUDA with Triton, or CPU tensors under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnlab import reference
from attnlab.core.patterns import causal, document, sliding_window
from attnlab.kernels import dense_core as dc
from attnlab.kernels import triton_local as tlo

from test_triton_local import HAS_TRITON, KDEV, needs_kernel  # same folder (pytest's rootdir import mode)

CPU = torch.device("cpu")


def _covered_pairs(pattern, n_q, n_kv, qt, kt) -> torch.Tensor:
    """(n_q, n_kv) int: how many times the split attends each pair (core runs + the edge plan's tiles,
    masked by the pattern as the kernel masks them)."""
    edge, c, _ = dc.cached_split(pattern, n_q, n_kv, (qt,), (kt,), CPU)
    count = torch.zeros(n_q, n_kv, dtype=torch.int64)
    for g in range(c.count):
        q0, k0 = (c.first + g) * c.q_tile, c.k_start + g * c.k_step
        count[q0:q0 + c.q_tile, k0:k0 + c.k_len] += 1
    mask = pattern.mask(n_q, n_kv)
    for t in range(edge.fbox.shape[0]):
        rows = slice(t * qt, min((t + 1) * qt, n_q))
        f0, e0 = int(edge.fbox[t, 0]), int(edge.fbox[t, 3])
        tiles = list(range(f0, f0 + e0)) + edge.part_idx[t, :int(edge.part_cnt[t])].tolist()
        for j in tiles:
            cols = slice(j * kt, min((j + 1) * kt, n_kv))
            count[rows, cols] += mask[rows, cols].long()
    return count


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(256, 1500), window=st.integers(400, 900), is_causal=st.booleans(),
       tiles=st.sampled_from([(64, 64), (64, 32), (128, 64), (32, 32)]))
def test_core_and_edges_cover_the_window_once(n, window, is_causal, tiles):
    qt, kt = tiles
    pattern = sliding_window(window, causal=is_causal)
    split = dc.cached_split(pattern, n, n, (qt,), (kt,), CPU)
    if split is None:
        assert dc.core(tlo.cached_plan(pattern, n, n, (dc.CORE_TILE,), (dc.CORE_TILE,), CPU)) is None
        return
    _, c, idx = split
    mask = pattern.mask(n, n)
    for g in range(c.count):  # every query of a core group sees its whole run
        q0, k0 = (c.first + g) * c.q_tile, c.k_start + g * c.k_step
        assert mask[q0:q0 + c.q_tile, k0:k0 + c.k_len].all()
    for t in range(len(idx)):  # an edge tile starts from its own rows of its group
        g, r0 = idx[t].tolist()
        if g >= 0:
            assert (c.first + g) * c.q_tile + r0 == t * qt
    assert (idx[:, 0] >= 0).sum() == c.count * c.q_tile // qt and c.k_len >= dc.MIN_CORE_KEYS
    assert torch.equal(_covered_pairs(pattern, n, n, qt, kt), mask.long())


def test_edge_pass_launches_the_long_tiles_first():
    edge, c, idx = dc.cached_split(sliding_window(1500), 4096, 4096, (64,), (32,), CPU)
    order = edge.order.long()
    assert sorted(order.tolist()) == list(range(len(idx)))
    work = edge.fbox[:, 3] + edge.part_cnt
    assert torch.all(work[order][:-1] >= work[order][1:])  # non-increasing
    assert (idx[order[:4], 0] < 0).all()  # the window's ends (outside the core) come first


def test_edge_tiles_must_divide_the_core_tile():
    with pytest.raises(ValueError, match="must divide 128"):
        dc.cached_split(sliding_window(600), 2048, 2048, (96,), (32,), CPU)


def test_core_of_the_benchmark_window():
    # 1-D window of 2048 at 32K on 128 x 128 tiles: 15 full key tiles per query tile go to the dense kernel
    plan = tlo.cached_plan(sliding_window(2048), 32768, 32768, (128,), (128,), CPU)
    c = dc.core(plan)
    assert c is not None and c.k_len == 1920 and c.k_step == 128 and c.count >= 240


def test_no_core_for_short_windows_and_grids():
    assert dc.core(tlo.cached_plan(sliding_window(200), 4096, 4096, (128,), (128,), CPU)) is None
    assert dc.core(tlo.cached_plan(causal(), 2048, 2048, (128,), (128,), CPU)) is None  # runs grow: no even stride


def test_core_of_packed_documents_repeats_one_run():
    # non-causal documents: every tile of a document sees the whole document (a run with step 0)
    c = dc.core(tlo.cached_plan(document([512, 256]), 768, 768, (128,), (128,), CPU))
    assert c == dc.Core(first=0, count=4, q_tile=128, k_start=0, k_step=0, k_len=512)


def test_refuses_grouped_heads_and_patterns_without_core():
    q = torch.randn(1, 4, 1024, 16)
    k = torch.randn(1, 2, 1024, 16)
    with pytest.raises(NotImplementedError, match="Hq == Hkv"):
        dc.attention(q, k, k, sliding_window(600), scale=0.25, q_tile=(64,), kv_tile=(64,))
    with pytest.raises(NotImplementedError, match="no run of full key tiles"):
        dc.attention(q, q, q, sliding_window(100), scale=0.25, q_tile=(64,), kv_tile=(64,))


def test_auto_route_refuses_cpu_and_float32():
    q = torch.randn(1, 2, 4096, 16)
    with pytest.raises(NotImplementedError, match="CUDA"):
        dc.run_pattern(q, q, q, sliding_window(2048), 0.25)


def test_dense_with_lse_matches_float64():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, n, 16, generator=g) for n in (32, 70, 70))
    out, lse = dc.dense_with_lse(q, k, v, 0.3)
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.3
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), torch.softmax(s, -1) @ v.double(), atol=1e-5, rtol=1e-5)


TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.mark.gpu
@needs_kernel
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(500, 1300), window=st.integers(400, 800), is_causal=st.booleans(), heads=st.integers(1, 3),
       batch=st.integers(1, 2), dtype=st.sampled_from([torch.float16, torch.bfloat16]), seed=st.integers(0, 9),
       tiles=st.sampled_from([(64, 32), (128, 64), (32, 64)]))
def test_split_matches_float64(n, window, is_causal, heads, batch, dtype, seed, tiles):
    if KDEV == "cpu" and dtype != torch.float32:
        dtype = torch.float32  # the CPU flash kernel and the interpreter: float32 exercises the same code
    pattern = sliding_window(window, causal=is_causal)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, 32, generator=g).to(KDEV, dtype) for _ in range(3))
    try:
        out = dc.attention(q, k, v, pattern, scale=32 ** -0.5, q_tile=(tiles[0],), kv_tile=(tiles[1],))
    except NotImplementedError:
        assert dc.cached_split(pattern, n, n, (tiles[0],), (tiles[1],), q.device) is None
        return
    ref = reference.attention(q.double(), k.double(), v.double(), pattern=pattern)
    err = (out.double() - ref).norm() / ref.norm()
    assert err < TOL[dtype], f"rel err {err:.2e}"


@pytest.mark.gpu
@needs_kernel
def test_split_through_the_dispatcher_matches_plain_kernel():
    dtype = torch.bfloat16 if KDEV == "cuda" else torch.float32
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 1024, 64, generator=g).to(KDEV, dtype) for _ in range(3))
    pattern = sliding_window(513)
    opts = tlo.default_options(tlo.cached_plan(pattern, 1024, 1024, (128,), (64,), q.device))
    plain = tlo.attention(q, k, v, pattern, q_tile=(128,), kv_tile=(64,), options={**opts, "dense_core": False})
    split = tlo.attention(q, k, v, pattern, q_tile=(128,), kv_tile=(64,), options={**opts, "dense_core": True})
    ref = reference.attention(q.double(), k.double(), v.double(), pattern=pattern)
    for out in (plain, split):
        assert (out.double() - ref).norm() / ref.norm() < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and Triton")
def test_auto_mode_splits_long_windows_and_matches_float64():
    import attnlab
    from attnlab.kernels import gluon_local as gk

    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(1, 2, 4096, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    pattern = sliding_window(2048)
    calls = (lambda: sum(dc.cached_split.cache_info()[:2]), lambda: sum(gk.cached_route.cache_info()[:2]))
    before = [c() for c in calls]
    out = attnlab.attention(q, k, v, pattern=pattern)
    took = [c() > b for c, b in zip(calls, before)]
    # On a Hopper GPU with Gluon the warp-specialized kernel runs the whole window; elsewhere the split.
    hopper = gk.AVAILABLE and torch.cuda.get_device_capability()[0] == 9
    assert took == ([False, True] if hopper else [True, took[1]])
    ref = reference.attention(q.double(), k.double(), v.double(), pattern=pattern)
    assert (out.double() - ref).norm() / ref.norm() < TOL[torch.bfloat16]
