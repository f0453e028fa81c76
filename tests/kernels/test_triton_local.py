"""attnlab's Triton local-attention kernel (kernels/triton_local.py).

CPU tests check the geometry the kernel runs on (per-axis bounds from attnlab patterns, and the
full/partial tile lists) against the patterns' dense masks; they need no Triton. GPU tests run the
kernel against the float64 reference on random shapes (marked gpu, skipped without CUDA + Triton).
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnlab import reference
from attnlab.core.patterns import blocked, causal, document, neighborhood, prefix_lm, sliding_window
from attnlab.kernels import triton_local as tlo

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and Triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KDEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(
    not (HAS_TRITON and (torch.cuda.is_available() or INTERPRET)), reason="needs Triton and CUDA (or TRITON_INTERPRET=1)"
)

GEOMETRY_CASES = [
    (sliding_window(7), 40, 40),
    (sliding_window(6, causal=True), 20, 50),
    (sliding_window(9), 50, 20),
    (causal(), 30, 12),
    (prefix_lm(5), 24, 24),
    (document([5, 9, 3]), 17, 17),
    (neighborhood(23, 7), 23, 23),
    (neighborhood(30, 8, stride=3, causal=True), 30, 30),
    (neighborhood((9, 10), (5, 3), stride=(2, 3)), 90, 90),
    (neighborhood((8, 12), (3, 5), causal=(True, False)), 96, 96),
    (blocked((8, 12), (4, 4), 2), 96, 96),
    (blocked((10, 7), 3, 1), 70, 70),
    (neighborhood((4, 5, 6), (3, 3, 5), stride=(1, 2, 1)), 120, 120),
    (sliding_window(9) & causal(), 30, 30),
    (sliding_window(11) & document([7, 12, 11]), 30, 30),
    (neighborhood((8, 12), 5) & blocked((8, 12), 4, 1), 96, 96),
]


@pytest.mark.parametrize("pattern,n_q,n_kv", GEOMETRY_CASES, ids=lambda x: repr(x))
def test_axes_reproduce_pattern_mask(pattern, n_q, n_kv):
    axes = tlo.axes_for(pattern, n_q, n_kv)
    assert axes is not None
    assert torch.equal(tlo.dense_mask(axes), pattern.mask(n_q, n_kv))
    assert tlo.density(axes) == pytest.approx(pattern.density(n_q, n_kv))


def _tile_tokens(grid, tile, t):
    """Row-major token ids of tile t (flat, row-major over tiles) of a grid; only in-grid tokens."""
    n_t = [math.ceil(g / s) for g, s in zip(grid, tile)]
    coords = []
    for n in reversed(n_t):
        coords.append(t % n)
        t //= n
    coords = coords[::-1]
    ranges = [range(c * s, min((c + 1) * s, g)) for c, s, g in zip(coords, tile, grid)]
    ids = torch.zeros(1, dtype=torch.long)
    for r, g in zip(ranges, grid):
        ids = (ids[:, None] * g + torch.tensor(list(r))[None, :]).reshape(-1)
    return ids


@pytest.mark.parametrize("pattern,n_q,n_kv", GEOMETRY_CASES, ids=lambda x: repr(x))
@pytest.mark.parametrize("tile_q,tile_k", [(16, 16), (8, 4)])
def test_tile_lists_match_mask(pattern, n_q, n_kv, tile_q, tile_k):
    """Full tiles are all-allowed boxes, partial ones hold some allowed pair, and no other tile does."""
    axes = tlo.axes_for(pattern, n_q, n_kv)
    q_grid, k_grid = tuple(a.n_q for a in axes), tuple(a.n_kv for a in axes)
    q_tile, k_tile = tlo._box(q_grid, tile_q), tlo._box(k_grid, tile_k)
    plan = tlo.build_plan(axes, q_tile, k_tile, "cpu")
    mask = pattern.mask(n_q, n_kv)
    n_qt, n_kt = math.prod(plan.n_q_tiles), math.prod(plan.n_kv_tiles)
    for i in range(n_qt):
        rows = _tile_tokens(q_grid, q_tile, i)
        full = set(plan.full_idx[i, : plan.full_cnt[i]].tolist())
        part = set(plan.part_idx[i, : plan.part_cnt[i]].tolist())
        assert not full & part
        for j in range(n_kt):
            sub = mask[rows][:, _tile_tokens(k_grid, k_tile, j)]
            whole = math.prod(k_tile) == sub.shape[1]
            if j in full:
                assert whole and bool(sub.all()), (i, j)
            elif j not in part:
                assert not bool(sub.any()), (i, j)


def test_plan_skips_far_tiles():
    """A 2-D neighborhood visits a box of tiles around each query tile, not the whole grid."""
    p = neighborhood((128, 128), 33)
    plan = tlo.cached_plan(p, 16384, 16384, (8, 16), (8, 16), "cpu")
    assert plan.tiles_visited <= 15 * 128  # at most a 5 x 3 box of key tiles per query tile
    assert 0 < plan.tiles_full < plan.tiles_visited
    assert plan.block_density < 0.12


def test_unsupported_patterns():
    assert not tlo.supports(neighborhood((12, 12), 3, dilation=2), 144, 144)
    assert not tlo.supports(sliding_window(5) | causal(), 20, 20)
    assert not tlo.supports(neighborhood((4, 5), 3) & causal(), 20, 20)  # flat causal is not per-axis
    assert tlo.supports(neighborhood((12, 12), 3), 144, 144)
    q = torch.randn(1, 1, 16, 8)
    with pytest.raises(NotImplementedError, match="CUDA"):
        tlo.run_pattern(q, q, q, sliding_window(3), 1.0)


def test_route_is_cached_and_declines_uncovered():
    """The per-call routing (geometry + tiles) is computed once per (pattern, lengths, head dim, device)."""
    cpu = torch.device("cpu")
    assert tlo._route(neighborhood((12, 12), 3, dilation=2), 144, 144, 64, cpu) is None
    p = sliding_window(129)
    first = tlo._route(p, 1000, 1000, 64, cpu)
    assert first == tlo.choose_tiles(p, 1000, 1000, 64, cpu)
    hits = tlo._route.cache_info().hits
    assert tlo._route(sliding_window(129), 1000, 1000, 64, cpu) == first  # an equal pattern, a new object
    assert tlo._route.cache_info().hits == hits + 1


def test_axis_from_mask_rejects_gaps():
    m = torch.tensor([[True, False, True], [False, True, False]])
    with pytest.raises(ValueError, match="intervals"):
        tlo.axis_from_mask(m)


# ---------------------------------------------------------------------------------------------
# GPU: the kernel against the float64 reference.
# ---------------------------------------------------------------------------------------------

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _check(pattern, n_q, n_kv, hq, hkv, d, dv, dtype, seed=0, tiles=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, n_q, d, generator=g).to("cuda", dtype)
    k = torch.randn(2, hkv, n_kv, d, generator=g).to("cuda", dtype)
    v = torch.randn(2, hkv, n_kv, dv, generator=g).to("cuda", dtype)
    if tiles is None:
        out = tlo.run_pattern(q, k, v, pattern, d ** -0.5)
    else:
        plan = tlo.cached_plan(pattern, n_q, n_kv, tiles[0], tiles[1], q.device)
        out = torch.full((2, hq, n_q, dv), float("nan"), device="cuda", dtype=dtype)  # poison: all must be written
        tlo.local_attention(q, k, v, plan, out=out, use_tma=tiles[2], full_box=not tiles[2])
    ref = reference.attention(q, k, v, pattern=pattern)
    assert torch.isfinite(out).all()
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < TOL[dtype], err


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("pattern,n_q,n_kv", GEOMETRY_CASES, ids=lambda x: repr(x))
def test_kernel_matches_reference(pattern, n_q, n_kv, dtype):
    _check(pattern, n_q, n_kv, 4, 2, 64, 64, dtype)


@gpu
@needs_gpu
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    h=st.sampled_from([(1, 1), (4, 1), (6, 2)]),
    dims=st.sampled_from([(32, 32), (64, 48), (80, 80), (128, 128), (256, 128)]),
    y=st.integers(1, 40),
    x=st.integers(1, 40),
    ky=st.integers(1, 9),
    kx=st.integers(1, 9),
    stride=st.integers(1, 4),
    causal_y=st.booleans(),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_kernel_random_2d_neighborhoods(h, dims, y, x, ky, kx, stride, causal_y, dtype, seed):
    ky, kx = min(ky, y), min(kx, x)
    p = neighborhood((y, x), (ky, kx), stride=(min(stride, ky), min(stride, kx)), causal=(causal_y, False))
    _check(p, y * x, y * x, h[0], h[1], dims[0], dims[1], dtype, seed)


@gpu
@needs_gpu
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n_q=st.integers(1, 700),
    n_kv=st.integers(1, 700),
    size=st.integers(1, 300),
    is_causal=st.booleans(),
    h=st.sampled_from([(2, 2), (4, 1)]),
    seed=st.integers(0, 2**16),
)
def test_kernel_random_windows_cross(n_q, n_kv, size, is_causal, h, seed):
    """1-D windows with Nq != Nk (bottom-right aligned); rows that see no key must be zeros."""
    _check(sliding_window(size, causal=is_causal), n_q, n_kv, h[0], h[1], 64, 64, torch.bfloat16, seed)


@gpu
@needs_gpu
@pytest.mark.parametrize("use_tma", [False, True], ids=["gather+box", "tma+list"])
@pytest.mark.parametrize(
    "pattern,n,tiles",
    [
        (neighborhood((37, 45), (9, 13)), 37 * 45, ((8, 16), (8, 8))),
        (neighborhood((9, 12, 20), (3, 5, 7), stride=(1, 2, 3)), 2160, ((4, 4, 8), (2, 4, 8))),
        (sliding_window(129), 1000, ((128,), (64,))),
    ],
    ids=lambda x: repr(x),
)
def test_kernel_tile_options_and_tma(pattern, n, tiles, use_tma):
    _check(pattern, n, n, 2, 1, 128, 128, torch.bfloat16, tiles=(*tiles, use_tma))


@gpu
@needs_gpu
def test_dispatch_uses_triton():
    """attnlab.attention(kernel="triton") reaches this kernel and agrees with the reference."""
    import attnlab

    p = neighborhood((24, 24), 7)
    q, k, v = (torch.randn(1, 2, 576, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = attnlab.attention(q, k, v, pattern=p, kernel="triton")
    ref = reference.attention(q, k, v, pattern=p)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-2


@gpu
@needs_gpu
@pytest.mark.parametrize(
    "pattern,n_q,n_kv,d",
    [
        (sliding_window(65, causal=True), 200, 520, 128),
        (neighborhood((32, 32), 9, stride=(2, 3)), 1024, 1024, 128),
        (neighborhood(777, 101, stride=5), 777, 777, 256),
    ],
    ids=lambda x: repr(x),
)
def test_kernel_float32_fits_shared_memory(pattern, n_q, n_kv, d):
    """float32 tiles take twice the bytes; the default tiles must still fit (seen failing on an H200)."""
    _check(pattern, n_q, n_kv, 2, 1, d, d, torch.float32)


# Opt-in kernel options (measured on the H200 by benchmarks/h200_triton_sweep.py): each must give the same
# attention. 16-bit exponentials round p before the sum, so they get a looser tolerance.
OPTIONS = [
    dict(late_l=True),
    dict(part_stages=1, hints=True),
    dict(full_box=False, part_stages=2),
    dict(persistent=1),
    dict(persistent=2, flatten=True, late_l=True),
    dict(half_exp=True),
    dict(half_exp=True, late_l=True, part_stages=1),
]


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()))
def test_kernel_options_match_reference(opts, dtype):
    """A 1-D window with Nq != Nk, a strided 2-D neighborhood with ragged tiles, and HaloNet blocks."""
    if KDEV == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton 3.6's interpreter multiplies bf16 tiles as raw bits (tl.dot)")
    tol = {torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype] if opts.get("half_exp") else TOL[dtype]
    cases = [
        (sliding_window(65, causal=True), 150, 300, ((64,), (32,))),
        (neighborhood((20, 24), (5, 7), stride=(2, 1)), 480, 480, ((8, 8), (4, 8))),
        (blocked((24, 24), 8, 4), 576, 576, ((8, 8), (8, 8))),
    ]
    g = torch.Generator().manual_seed(11)
    for pattern, n_q, n_kv, (q_tile, kv_tile) in cases:
        q = torch.randn(1, 4, n_q, 64, generator=g).to(KDEV, dtype)
        k, v = (torch.randn(1, 2, n_kv, 64, generator=g).to(KDEV, dtype) for _ in range(2))
        plan = tlo.cached_plan(pattern, n_q, n_kv, q_tile, kv_tile, torch.device(KDEV))
        out = torch.full_like(q, float("nan"))  # poison: every row must be written
        tlo.local_attention(q, k, v, plan, out=out, **opts)
        ref = reference.attention(q, k, v, pattern=pattern)
        assert torch.isfinite(out).all(), pattern
        err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert err < tol, (pattern, err)


def test_default_options_and_no_masked_loop_rule():
    """Tile-aligned plans (no partial tile) drop the masked loop by default, 1-D windows on 128 x 128 tiles
    with 8 warps run the flattened persistent grid, others the plain kernel; dropping the masked loop
    (part_stages=0) is refused for a plan that has partial tiles."""
    cpu = torch.device("cpu")
    aligned = tlo.cached_plan(blocked((32, 32), 16, 8), 1024, 1024, (8, 8), (8, 8), cpu)
    ragged = tlo.cached_plan(sliding_window(65), 300, 300, (64,), (32,), cpu)
    window = tlo.cached_plan(sliding_window(513), 4096, 4096, (128,), (128,), cpu)
    assert aligned.tiles_full == aligned.tiles_visited and tlo.default_options(aligned) == {"part_stages": 0}
    assert ragged.tiles_full < ragged.tiles_visited and tlo.default_options(ragged) == {}
    assert tlo.default_options(window) == {"persistent": 1, "flatten": True, "late_l": True}
    assert tlo.default_options(window, num_warps=4) == {}
    q = torch.randn(1, 1, 300, 16)
    with pytest.raises(ValueError, match="part_stages=0"):
        tlo.local_attention(q, q, q, ragged, part_stages=0)


@gpu
@needs_kernel
def test_kernel_without_masked_loop_matches_reference():
    """part_stages=0 compiles the kernel without its masked loop: exact on tile-aligned HaloNet blocks."""
    p = blocked((32, 32), 16, 8)
    plan = tlo.cached_plan(p, 1024, 1024, (8, 8), (8, 8), torch.device(KDEV))
    assert plan.tiles_full == plan.tiles_visited
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 1024, 64, generator=g).to(KDEV, torch.float16) for _ in range(3))
    out = tlo.local_attention(q, k, v, plan, part_stages=0)
    ref = reference.attention(q, k, v, pattern=p)
    assert ((out.double() - ref).norm() / ref.norm()).item() < TOL[torch.float16]
