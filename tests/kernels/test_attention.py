"""attnlab.attention against the exact float64 reference: every pattern, every non-compiled kernel path.

Compiled FlexAttention has its own few, small tests in test_flex.py (compiling costs seconds on CPU).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnlab
from attnlab import reference
from attnlab.core.patterns import (
    block_sparse,
    blocked,
    causal,
    document,
    neighborhood,
    prefix_lm,
    sliding_window,
)
from attnlab.kernels import attention, attention_with_lse
from attnlab.kernels import banded as banded_mod
from kernel_helpers import random_qkv

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
KINDS = ["none", "causal", "window", "prefix", "document", "block_sparse", "nbhd1d", "nbhd2d", "blocked"]
SELF_ONLY = {"document", "nbhd1d", "nbhd2d", "blocked"}


@st.composite
def problems(draw, max_n: int = 200):
    """(pattern, B, Hq, Hkv, Nq, Nk, D, Dv): random shapes with GQA ratios 1/2/3, Nq != Nk allowed."""
    kind = draw(st.sampled_from(KINDS))
    if kind == "nbhd2d":
        shape = (draw(st.integers(2, 12)), draw(st.integers(2, 12)))
        n_q = n_kv = math.prod(shape)
    elif kind in SELF_ONLY:
        n_q = n_kv = draw(st.integers(1, max_n))
    else:
        n_q, n_kv = draw(st.integers(1, max_n)), draw(st.integers(1, max_n))
    if kind == "none":
        pattern = None
    elif kind == "causal":
        pattern = causal()
    elif kind == "window":
        pattern = sliding_window(draw(st.integers(1, n_kv + 2)), causal=draw(st.booleans()))
    elif kind == "prefix":
        pattern = prefix_lm(draw(st.integers(0, n_kv)))
    elif kind == "document":
        cuts = sorted(draw(st.sets(st.integers(1, max(1, n_q - 1)), max_size=5)) - {n_q})
        pattern = document([b - a for a, b in zip([0] + cuts, cuts + [n_q])])
    elif kind == "block_sparse":
        bs = draw(st.integers(1, 48))
        qb, kb = -(-n_q // bs), -(-n_kv // bs)
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
        pattern = block_sparse(torch.rand(qb, kb, generator=g) < draw(st.floats(0.0, 1.0)), bs)
    elif kind == "nbhd1d":
        dil = draw(st.integers(1, max(1, min(3, n_q))))
        ks = draw(st.integers(1, max(1, n_q // dil)))
        pattern = neighborhood((n_q,), ks, dilation=dil, stride=draw(st.integers(1, ks)), causal=draw(st.booleans()))
    elif kind == "nbhd2d":
        ks = (draw(st.integers(1, shape[0])), draw(st.integers(1, shape[1])))
        pattern = neighborhood(shape, ks, causal=(False, draw(st.booleans())))
    else:  # blocked
        blk = draw(st.integers(1, n_q))
        pattern = blocked((n_q,), blk, draw(st.integers(0, 8)))
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.sampled_from([1, 2, 3]))
    d = draw(st.sampled_from([16, 32, 64]))
    dv = draw(st.sampled_from([d, 24]))
    return pattern, b, hq, hkv, n_q, n_kv, d, dv


def _check(out, q, k, v, pattern, dtype, **kw):
    ref = reference.attention(q, k, v, pattern=pattern, **kw)
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("kernel", ["auto", "sdpa", "chunked", "banded"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prob=problems())
def test_matches_reference_fp32(kernel, prob):
    pattern, *shape = prob
    if kernel == "banded" and pattern is None:
        pattern = sliding_window(7)
    q, k, v = random_qkv(*shape)
    _check(attention(q, k, v, pattern=pattern, kernel=kernel), q, k, v, pattern, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["auto", "chunked", "banded"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prob=problems(max_n=96))
def test_matches_reference_half(dtype, kernel, prob):
    pattern, *shape = prob
    if kernel == "banded" and pattern is None:
        pattern = causal()
    q, k, v = random_qkv(*shape, dtype=dtype)
    _check(attention(q, k, v, pattern=pattern, kernel=kernel), q, k, v, pattern, dtype)


@pytest.mark.parametrize("pattern", [None, causal()])
@pytest.mark.parametrize("n_q,n_kv", [(50, 50), (20, 50), (50, 20)])  # the four CAB patterns, Nq > Nk too
def test_cab_patterns(pattern, n_q, n_kv):
    q, k, v = random_qkv(2, 6, 2, n_q, n_kv, 32, 16)
    for kernel in ("auto", "sdpa", "chunked"):
        _check(attention(q, k, v, pattern=pattern, kernel=kernel), q, k, v, pattern, torch.float32)


def test_cab_causal_cross_is_bottom_right():
    """CAB's check: causal output row i equals attention over only the keys its aligned position sees."""
    q, k, v = random_qkv(1, 2, 2, 10, 25, 16, 16)
    out = attention(q, k, v, pattern=causal())
    for i in range(10):
        last = i + 25 - 10
        alone = attention(q[:, :, i : i + 1], k[:, :, : last + 1], v[:, :, : last + 1])
        torch.testing.assert_close(out[:, :, i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_dense_is_sdpa_itself():
    q, k, v = random_qkv(2, 8, 2, 64, 80, 32, 32)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert torch.equal(attnlab.attention(q, k, v), want)
    q, k, v = random_qkv(1, 4, 4, 64, 64, 32, 32)
    assert torch.equal(attnlab.attention(q, k, v, pattern=causal()), F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("kernel", ["auto", "sdpa", "chunked", "banded"])
def test_length_one(kernel):
    for n_q, n_kv in ((1, 1), (1, 40)):
        q, k, v = random_qkv(1, 4, 2, n_q, n_kv, 16, 8)
        for pattern in (causal(), sliding_window(5, causal=True)):
            _check(attention(q, k, v, pattern=pattern, kernel=kernel), q, k, v, pattern, torch.float32)


@pytest.mark.parametrize("kernel", ["auto", "sdpa", "chunked", "banded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fully_masked_rows_are_zero(kernel, dtype):
    q, k, v = random_qkv(1, 2, 1, 40, 30, 16, 16, dtype=dtype)
    layout = torch.tensor([[True, False, True], [False, False, False], [False, True, False], [True, True, True]])
    for pattern in (causal(), block_sparse(layout, 10)):  # causal with Nq > Nk: first 10 rows see nothing
        out = attention(q, k, v, pattern=pattern, kernel=kernel)
        assert not torch.isnan(out).any()
        assert (out[:, :, 0:10] == 0).all() if isinstance(pattern, type(causal())) else (out[:, :, 10:20] == 0).all()
        _check(out, q, k, v, pattern, dtype)


@pytest.mark.parametrize("kernel", ["auto", "sdpa", "chunked", "banded"])
def test_fp16_large_logits(kernel):
    q, k, v = random_qkv(1, 2, 2, 70, 70, 64, 64)
    q, k = q * 30, k * 30  # scores ~ 1e4 * 8: exp would overflow fp16 without max subtraction
    q, k, v = q.half(), k.half(), v.half()
    out = attention(q, k, v, pattern=sliding_window(15), kernel=kernel)
    assert torch.isfinite(out).all()
    _check(out, q, k, v, sliding_window(15), torch.float16)


def test_score_mod_alibi_chunked():
    def alibi(score, b, h, q_idx, kv_idx):
        return score - (h + 1) * 0.1 * (q_idx - kv_idx).abs()

    q, k, v = random_qkv(2, 4, 2, 33, 47, 16, 16)
    for pattern in (None, causal(), sliding_window(9)):
        for kernel in ("auto", "chunked"):
            out = attention(q, k, v, pattern=pattern, score_mod=alibi, kernel=kernel)
            _check(out, q, k, v, pattern, torch.float32, score_mod=alibi)


def test_float64_runs_exact():
    q, k, v = random_qkv(1, 4, 2, 30, 41, 16, 16, dtype=torch.float64)
    out = attention(q, k, v, pattern=sliding_window(7))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference.attention(q, k, v, pattern=sliding_window(7)), atol=1e-12, rtol=1e-12)


def test_attention_with_lse():
    q, k, v = random_qkv(1, 4, 2, 20, 30, 16, 16)
    out, lse = attention_with_lse(q, k, v, pattern=causal())
    s = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) / 4
    s = s.masked_fill(~causal().mask(20, 30), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
    _check(out, q, k, v, causal(), torch.float32)


@pytest.mark.parametrize("layout", ["bnhd", "contiguous"])
@pytest.mark.parametrize("n", [700, 1500])  # 1500: the strided group runs in several SDPA calls (STRIDED_CHUNK)
def test_banded_long_window_strided_and_edges(layout, n):
    """A length where the banded path has a strided interior group and border blocks on both sides, each
    side run as one block of its real rows (contiguous slices of q, k, v)."""
    h, d = 2, 16
    q, k, v = random_qkv(1, 2 * h, h, n, n, d, d)
    if layout == "bnhd":  # the (B, N, H, D) layout transformers models produce, seen through a transpose
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    for pattern in (sliding_window(65), sliding_window(64, causal=True), neighborhood((n,), 33)):
        plan = banded_mod.plan(pattern, n, n, q.device)
        assert plan is not None and all(g.strided for g in plan.groups) and len(plan.groups) == 3
        interior, *borders = plan.groups
        assert interior.blocks.numel() > 1 and [b.q_rows.shape[0] for b in borders] == [1, 1]
        rows = torch.cat([interior.q_rows.flatten(), *(b.q_rows.flatten() for b in borders)])
        assert sorted(rows.tolist()) == list(range(n))  # every query row exactly once
        if n == 1500:
            assert plan.groups[0].blocks.numel() > banded_mod.STRIDED_CHUNK
        _check(attention(q, k, v, pattern=pattern, kernel="banded"), q, k, v, pattern, torch.float32)
        _check(attention(q, k, v, pattern=pattern), q, k, v, pattern, torch.float32)  # auto


def test_decoding_a_window_needs_no_compile():
    from attnlab.kernels import choose_kernel

    q, k, v = random_qkv(1, 4, 2, 3, 120000, 16, 16)
    assert choose_kernel(q, k, sliding_window(1024, causal=True)) == "banded"
    out = attention(q, k, v, pattern=sliding_window(1024, causal=True))
    _check(out, q, k, v, sliding_window(1024, causal=True), torch.float32)


def test_banded_gathers_borders_wider_than_two_spans():
    """1-D HaloNet blocks of 50 on 32-query blocks: no long strided run, and the blocks around it span
    far more than two windows, so they stay gathered (a mask per block); still exact."""
    pattern = blocked((1000,), 50, 10)
    plan = banded_mod.plan(pattern, 1000, 1000, torch.device("cpu"))
    assert plan is not None and [g.strided for g in plan.groups] == [True, False]
    q, k, v = random_qkv(2, 4, 2, 1000, 1000, 16, 16)
    _check(attention(q, k, v, pattern=pattern, kernel="banded"), q, k, v, pattern, torch.float32)


def test_banded_declines_wide_patterns():
    assert banded_mod.plan(causal(), 1024, 1024, torch.device("cpu")) is None
    assert banded_mod.plan(sliding_window(33), 1024, 1024, torch.device("cpu")) is not None


# ---- clear errors -------------------------------------------------------------------------------


def _raises(match, fn):
    with pytest.raises(ValueError, match=match):
        fn()


def test_errors_name_the_argument():
    q, k, v = random_qkv(1, 4, 2, 16, 16, 16, 16)
    _raises("`q` must have 4 dims", lambda: attention(q[0], k, v))
    _raises("multiple of key/value heads", lambda: attention(q[:, :3], k, v))
    _raises("share one dtype", lambda: attention(q.half(), k, v))
    _raises("one device", lambda: attention(q, k.to("meta"), v))
    _raises("head dim", lambda: attention(q[..., :8], k, v))
    _raises("`kernel` must be one of", lambda: attention(q, k, v, kernel="fast"))
    _raises("`pattern` must be an attnlab Pattern", lambda: attention(q, k, v, pattern="causal"))
    _raises("`scale` must be a positive", lambda: attention(q, k, v, scale=-1.0))
    _raises("takes no `score_mod`", lambda: attention(q, k, v, score_mod=lambda s, b, h, i, j: s, kernel="sdpa"))
    _raises("needs a `pattern`", lambda: attention(q, k, v, kernel="banded"))
    # Forced GPU kernels on a CPU tensor say why they cannot run it.
    window = sliding_window(8)
    _raises("kernel='gluon' cannot run this call: .*(needs CUDA|not available)",
            lambda: attention(q, k, v, pattern=window, kernel="gluon"))
    _raises("kernel='triton' cannot run this call: .*(CUDA|not available)",
            lambda: attention(q, k, v, pattern=window, kernel="triton"))


def test_errors_from_pattern_geometry():
    _raises("kernel_size", lambda: neighborhood((4, 4), 5))
    _raises("dilation", lambda: neighborhood((8,), 3, dilation=3))
    q, k, v = random_qkv(1, 2, 2, 19, 19, 16, 16)
    for kernel in ("auto", "chunked", "banded", "sdpa", "flex"):
        _raises("n_q == n_kv == prod", lambda: attention(q, k, v, pattern=neighborhood((5, 4), 3), kernel=kernel))
    # A large call goes towards FlexAttention: the pattern's error must reach the caller, and must not
    # be mistaken for FlexAttention failing (which would switch this dtype to the chunked fallback).
    q, k, v = random_qkv(1, 2, 2, 599, 599, 16, 16)
    _raises("n_q == n_kv == prod", lambda: attention(q, k, v, pattern=neighborhood((25, 24), 3)))
    from attnlab.kernels.attention import _flex_failed

    assert not _flex_failed
