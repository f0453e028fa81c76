"""The Gluon ping-pong kernel for local attention on Hopper (kernels/gluon_local.py).

CPU tests check the host side without a GPU: which patterns get a route, that the key boxes it hands
the kernel visit every allowed pair exactly once and that the per-axis bounds then mask exactly the
pattern, the copy split of tiles, the dispatch rule, and the reasons it gives for calls it cannot run.
GPU tests (marked gpu; they need a Hopper GPU and Triton with Gluon) run the kernel against the float64
reference.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from attnlab import reference
from attnlab.core.patterns import blocked, causal, neighborhood, sliding_window
from attnlab.kernels import choose_kernel
from attnlab.kernels import gluon_local as gk

CPU = torch.device("cpu")
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and gk.AVAILABLE
gpu = pytest.mark.gpu
needs_hopper = pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU and Triton with Gluon")


def _box_count(route, n_q, n_kv) -> torch.Tensor:
    """(n_q, n_kv) int: how often the kernel visits each pair, restated from the boxes (token origins,
    extents in key tiles); keys past the grid are dropped (the kernel masks them)."""
    qt, kt, qg, kg = route.q_tile, route.kv_tile, route.q_grid, route.kv_grid
    n_qt1 = qg[1] // qt[1]
    count = torch.zeros(n_q, n_kv, dtype=torch.int64)
    for t in range(route.boxes.shape[0]):
        qy = torch.arange(qt[0])[:, None] + (t // n_qt1) * qt[0]
        qx = torch.arange(qt[1])[None, :] + (t % n_qt1) * qt[1]
        rows = (qy * qg[1] + qx).flatten()
        r0, c0, nr, nc = route.boxes[t].tolist()
        ky = torch.arange(r0, r0 + nr * kt[0])[:, None]
        kx = torch.arange(c0, c0 + nc * kt[1])[None, :]
        inside = (ky < kg[0]) & (kx < kg[1])
        cols = (ky * kg[1] + kx)[inside]
        count[rows[:, None], cols[None, :]] += 1
    return count


def _window_mask(route, n_q, n_kv) -> torch.Tensor:
    """(n_q, n_kv) bool: the kernel's mask, restated from the route's per-axis bounds (2-D view)."""
    qg, kg = route.q_grid, route.kv_grid
    lo0, hi0, lo1, hi1 = (b.cpu().long() for b in route.bounds)
    qy, qx = torch.arange(n_q) // qg[1], torch.arange(n_q) % qg[1]
    ky, kx = torch.arange(n_kv) // kg[1], torch.arange(n_kv) % kg[1]
    return ((ky[None] >= lo0[qy][:, None]) & (ky[None] < hi0[qy][:, None])
            & (kx[None] >= lo1[qx][:, None]) & (kx[None] < hi1[qx][:, None]))


@pytest.mark.parametrize("pattern, n_q, n_kv, masked", [
    (neighborhood((64, 64), 48, stride=16), 4096, 4096, False),
    (neighborhood((32, 48), 16, stride=16), 1536, 1536, False),
    (blocked((64, 64), 16, 0), 4096, 4096, False),
    (blocked((32, 48), 32, 16), 1536, 1536, False),
    (sliding_window(2 * 1024), 1024, 1024, False),  # dense: the window covers every key
    (neighborhood(2048, 512, stride=256), 2048, 2048, False),  # 1-D strided, tile-aligned
    (sliding_window(257), 1024, 1024, True),
    (sliding_window(300, causal=True), 1024, 1536, True),  # cross: Nq != Nk
    (causal(), 768, 768, True),
    (neighborhood((32, 32), 7), 1024, 1024, True),
    (blocked((64, 64), 16, 8), 4096, 4096, True),  # HaloNet: exact 32x32 boxes inside, clipped at the borders
    (blocked((32, 48), 16, 8), 1536, 1536, True),
])
def test_route_visits_every_pair_once_and_masks_to_the_pattern(pattern, n_q, n_kv, masked):
    route = gk.cached_route(pattern, n_q, n_kv, CPU)
    assert route is not None and route.masked == masked
    dummy = torch.empty(1, 1, n_q, 128, dtype=torch.bfloat16)
    assert gk.unsupported(route, dummy, dummy, dummy) is not None  # not on a CPU
    count = _box_count(route, n_q, n_kv)
    want = pattern.mask(n_q, n_kv)
    assert count.max() <= 1 and bool((count[want] == 1).all())  # every allowed pair visited, none twice
    assert torch.equal(_window_mask(route, n_q, n_kv) & (count == 1), want)  # the mask leaves exactly the pattern
    assert masked == bool(count.sum() > want.sum())


@pytest.mark.parametrize("pattern, n", [
    (neighborhood((32, 32), 3, dilation=2), 1024),  # not interval-separable
    (neighborhood((8, 8, 16), 4, stride=4), 1024),  # 3-D
])
def test_no_route(pattern, n):
    assert gk.cached_route(pattern, n, n, CPU) is None


def test_halo_boxes_are_exact_inside_the_grid():
    route = gk.cached_route(blocked((128, 128), 16, 8), 16384, 16384, CPU)
    r0, c0, nr, nc = route.boxes.T
    inner = (r0 >= 8) & (c0 >= 8) & (r0 + nr * route.kv_tile[0] <= 120) & (c0 + nc * route.kv_tile[1] <= 120)
    assert bool(inner.any())  # interior query tiles: the 32 x 32 halo box, no more
    assert torch.equal((nr * route.kv_tile[0])[inner], torch.full_like(nr[inner], 32))
    assert torch.equal((nc * route.kv_tile[1])[inner], torch.full_like(nc[inner], 32))


@pytest.mark.parametrize("pattern, n", [
    (blocked((64, 64), 16, 8), 4096),
    (neighborhood((32, 32), 7), 1024),
    (neighborhood((64, 64), 48, stride=16), 4096),
    (sliding_window(257), 1024),
    (causal(), 768),
])
def test_half_extremes_restate_each_warpgroups_rows(pattern, n):
    """Per query tile and 64-row half: the extremes of its rows' windows and whether they all share one
    (the kernel then masks with one vector over the keys), restated row by row from the bounds."""
    route = gk.cached_route(pattern, n, n, CPU)
    qt, qg = route.q_tile, route.q_grid
    lo0, hi0, lo1, hi1 = (b.cpu().long() for b in route.bounds)
    n_qt1 = qg[1] // qt[1]
    for t in range(route.boxes.shape[0]):
        for half in range(2):
            m = torch.arange(half * 64, half * 64 + 64)
            y, x = (t // n_qt1) * qt[0] + m // qt[1], (t % n_qt1) * qt[1] + m % qt[1]
            rows = torch.stack([lo0[y], hi0[y], lo1[x], hi1[x]], 1)
            want = [int(rows[:, 0].max()), int(rows[:, 1].min()), int(rows[:, 2].max()), int(rows[:, 3].min()),
                    int(bool((rows == rows[0]).all()))]
            assert route.extremes[t, half].tolist() == want


def test_halo_halves_share_one_window():
    route = gk.cached_route(blocked((128, 128), 16, 8), 16384, 16384, CPU)
    assert bool((route.extremes[..., 4] == 1).all())  # every half lies in one 16x16 block: column masks only


def _route_inputs(pattern, n, b=1, hq=2, hkv=2, d=128, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, n, d, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(b, hkv, n, d, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    return q, k, v


def _check(pattern, n, **kw):
    q, k, v = _route_inputs(pattern, n, **kw)
    out = gk.run_pattern(q, k, v, pattern, q.shape[-1] ** -0.5)
    ref = reference.attention(q.double(), k.double(), v.double(), pattern=pattern)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err


@gpu
@needs_hopper
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(side=st.sampled_from([(32, 32), (32, 48), (48, 64)]), kernel_blocks=st.integers(1, 3),
       kind=st.sampled_from(["strided", "blocked"]), heads=st.sampled_from([(2, 2), (4, 2), (4, 1)]),
       b=st.integers(1, 2), d=st.sampled_from([64, 128]), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       seed=st.integers(0, 100))
def test_kernel_matches_float64_on_tile_aligned_patterns(side, kernel_blocks, kind, heads, b, d, dtype, seed):
    if kind == "strided":
        assume(16 * kernel_blocks <= min(side))
        pattern = neighborhood(side, 16 * kernel_blocks, stride=16)
    else:
        pattern = blocked(side, 16, 8 * (kernel_blocks - 1))
    n = math.prod(side)
    if gk.cached_route(pattern, n, n, torch.device("cuda")) is None:
        pytest.skip("no tile-aligned plan")
    _check(pattern, n, b=b, hq=heads[0], hkv=heads[1], d=d, dtype=dtype, seed=seed)


@gpu
@needs_hopper
@pytest.mark.parametrize("n", [128, 1024, 4096])
def test_kernel_dense_and_1d_strided(n):
    _check(sliding_window(2 * n), n)
    if n >= 1024:
        _check(neighborhood(n, n // 4, stride=n // 8), n, hq=4, hkv=2)


@gpu
@needs_hopper
def test_attention_routes_tile_aligned_patterns_to_gluon():
    import attnlab

    pattern = neighborhood((64, 64), 48, stride=16)
    q, k, v = _route_inputs(pattern, 4096)
    assert choose_kernel(q, k, pattern) == "gluon"
    ref = reference.attention(q.double(), k.double(), v.double(), pattern=pattern)
    for kernel in ("auto", "gluon"):
        out = attnlab.attention(q, k, v, pattern=pattern, kernel=kernel)
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
    with pytest.raises(ValueError, match="kernel='gluon' cannot run this call: .*no plan"):
        attnlab.attention(q, k, v, pattern=neighborhood((64, 64), 3, dilation=2), kernel="gluon")


@gpu
@needs_hopper
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_q=st.sampled_from([128, 384, 1024]), extra=st.sampled_from([0, 128, 512]), window=st.integers(1, 700),
       is_causal=st.booleans(), heads=st.sampled_from([(2, 2), (4, 1)]), d=st.sampled_from([64, 128]),
       seed=st.integers(0, 100))
def test_kernel_matches_float64_on_masked_1d_windows(n_q, extra, window, is_causal, heads, d, seed):
    pattern = sliding_window(window, causal=is_causal)
    n_kv = n_q + extra
    q, k, v = _route_inputs(pattern, n_kv, hq=heads[0], hkv=heads[1], d=d, seed=seed)
    q = q[:, :, :n_q]
    out = gk.run_pattern(q, k, v, pattern, d ** -0.5)
    ref = reference.attention(q.double(), k.double(), v.double(), pattern=pattern)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
    assert torch.isfinite(out).all()


@gpu
@needs_hopper
@pytest.mark.parametrize("pattern, n", [
    (neighborhood((32, 32), 7), 1024), (neighborhood((48, 64), (9, 17)), 3072),
    (blocked((64, 64), 16, 8), 4096), (causal(), 1024),
])
def test_kernel_matches_float64_on_masked_patterns(pattern, n):
    _check(pattern, n, hq=4, hkv=2)


@gpu
@needs_hopper
@pytest.mark.parametrize("programs", [1, 3, 7, 132])
@pytest.mark.parametrize("pattern, n", [
    (sliding_window(333, causal=True), 1024),  # items of 1 to 4 key tiles: ring and turns run across items
    (neighborhood((48, 64), 48, stride=16), 3072), (causal(), 896),
])
def test_persistent_grid_matches_float64(programs, pattern, n):
    q, k, v = _route_inputs(pattern, n, b=2, hq=4, hkv=2)
    route = gk.cached_route(pattern, n, n, q.device)
    out = gk.local_attention(q, k, v, route, scale=128 ** -0.5, programs=programs)
    ref = reference.attention(q.double(), k.double(), v.double(), pattern=pattern)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("pattern, n, gluon", [
    (blocked((128, 128), 16, 8), 16384, True),  # exact halo boxes: no more pairs than 8x8 tiles
    (neighborhood((128, 128), 33), 16384, True),
    (neighborhood((128, 128), 48, stride=16), 16384, True),
    (sliding_window(2048), 32768, True),
])
def test_dispatch_work_ratio(pattern, n, gluon):
    from attnlab.kernels import triton_local as tlo

    qt, kt, _ = tlo._route(pattern, n, n, 128, CPU)
    base = gk.visited_pairs(tlo.cached_plan(pattern, n, n, qt, kt, CPU))
    route = gk.cached_route(pattern, n, n, CPU)
    assert (route.pairs <= gk.WORK_RATIO * base) == gluon


def test_applies_needs_a_hopper_gpu():
    q = torch.empty(1, 2, 2048, 128, dtype=torch.bfloat16)
    assert not gk.applies(q, q, neighborhood(2048, 512, stride=256))  # a CPU tensor
    assert not gk.applies(q, q, None)


@gpu
@needs_hopper
def test_attention_with_grad_runs_a_differentiable_kernel():
    import attnlab

    pattern = sliding_window(512)
    q, k, v = (t.requires_grad_() for t in _route_inputs(pattern, 1024))
    out = attnlab.attention(q, k, v, pattern=pattern)
    out.float().square().sum().backward()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    reference.attention(qd, kd, vd, pattern=pattern).square().sum().backward()
    for a, b in ((q, qd), (k, kd), (v, vd)):
        assert ((a.grad.double() - b.grad).norm() / b.grad.norm()).item() < 3e-2
