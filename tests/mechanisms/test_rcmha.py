"""RCMHA (paper 32) vs float64 loop re-statements of its depth-wise convolutions and relative-position scores."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.mechanisms.rcmha import (
    RCMHAttention,
    depthwise_conv,
    relative_attention,
    relative_distances,
    sinusoidal_encoding,
)


def _plain_conv(x, weight, causal):
    """y[t, c] = sum_m weight[c, m] * x[t - K + 1 + m, c] (causal) or x[t - (K-1)//2 + m, c]; outside = 0."""
    b, n, c = x.shape
    kk = weight.shape[-1]
    start = kk - 1 if causal else (kk - 1) // 2
    y = torch.zeros_like(x)
    for t in range(n):
        for m in range(kk):
            s = t - start + m
            if 0 <= s < n:
                y[:, t] += weight[:, 0, m] * x[:, s]
    return y


def _plain_attention(q, k, v, rel_of, u, w, causal):
    """score_ij = ((q_i + u).k_j + (q_i + w).r[(i + Nk - Nq) - j]) / sqrt(d), softmax over visible j."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    out = torch.zeros(b, h, nq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(nq):
                js = [j for j in range(nk) if not causal or j <= i + nk - nq]
                if js:
                    s = torch.stack([((q[bi, hi, i] + u[hi]) @ k[bi, hi, j]
                                      + (q[bi, hi, i] + w[hi]) @ rel_of(hi, i + nk - nq - j)) / math.sqrt(d)
                                     for j in js])
                    out[bi, hi, i] = torch.softmax(s, 0) @ v[bi, hi, js]
    return out


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), nq=st.integers(1, 7), nk=st.integers(1, 7),
       d=st.integers(1, 5), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_relative_attention_matches_float64_restatement(b, h, nq, nk, d, causal, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, h, nk, d, generator=g, dtype=torch.float64) for _ in range(2))
    rel = torch.randn(h, nq + nk - 1, d, generator=g, dtype=torch.float64)
    u, w = (torch.randn(h, d, generator=g, dtype=torch.float64) for _ in range(2))
    dist = relative_distances(nq, nk).tolist()
    rel_of = lambda hi, delta: rel[hi, dist.index(delta)]  # noqa: E731
    torch.testing.assert_close(relative_attention(q, k, v, rel, u, w, causal=causal),
                               _plain_attention(q, k, v, rel_of, u, w, causal))


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), n=st.integers(1, 8), c=st.integers(1, 4), kk=st.integers(1, 5),
       causal=st.booleans(), seed=st.integers(0, 2**16))
def test_depthwise_conv_matches_loop(b, n, c, kk, causal, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    weight = torch.randn(c, 1, kk, generator=g, dtype=torch.float64)
    torch.testing.assert_close(depthwise_conv(x, weight, causal=causal), _plain_conv(x, weight, causal))


def test_sinusoidal_encoding_of_signed_distances():
    enc = sinusoidal_encoding(torch.tensor([-2, 0, 3]), 4)
    for row, pos in enumerate((-2, 0, 3)):
        for i in range(2):
            assert enc[row, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 4)))
            assert enc[row, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 4)))


@pytest.mark.parametrize("cross,causal", [(False, True), (False, False), (True, True)])
def test_module_matches_restatement(cross, causal):
    torch.manual_seed(0)
    m = RCMHAttention(8, 2, causal=causal, kernel_size=3).double()
    with torch.no_grad():  # move every parameter off its (identity / zero) start
        for p in (m.conv_q, m.conv_k, m.conv_v, m.u, m.w):
            p.normal_()
        x = torch.randn(2, 5, 8, dtype=torch.float64)
        ctx = torch.randn(2, 7, 8, dtype=torch.float64) if cross else None
        src = x if ctx is None else ctx
        split = lambda t: t.view(2, t.shape[1], 2, 4).transpose(1, 2)  # noqa: E731
        q = split(_plain_conv(x @ m.q_proj.weight.T, m.conv_q, causal))
        k = split(_plain_conv(src @ m.k_proj.weight.T, m.conv_k, causal))
        v = split(_plain_conv(src @ m.v_proj.weight.T, m.conv_v, causal))
        rel_of = lambda hi, delta: (  # noqa: E731
            m.r_proj.weight @ sinusoidal_encoding(torch.tensor([delta]), 8)[0])[4 * hi: 4 * hi + 4]
        want = _plain_attention(q, k, v, rel_of, m.u, m.w, causal).transpose(1, 2).reshape(2, 5, 8)
        torch.testing.assert_close(m(x, ctx), want @ m.o_proj.weight.T)


def test_causal_and_gradients():
    torch.manual_seed(0)
    m = RCMHAttention(8, 2, causal=True)
    x = torch.randn(1, 7, 8, requires_grad=True)
    x2 = x.detach().clone()
    x2[:, 5:] += 1.0  # the causal convolution must not leak the future either
    torch.testing.assert_close(m(x2)[:, :5], m(x)[:, :5])
    assert not torch.allclose(m(x2)[:, 5:], m(x)[:, 5:])
    m(x).square().sum().backward()
    assert x.grad.abs().sum() > 0
    missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_noncausal_convolution_sees_the_next_token():
    torch.manual_seed(0)
    m = RCMHAttention(8, 2, causal=False).double()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    assert m.conv_q[:, 0].argmax(-1).eq(1).all()  # identity tap in the centre of a width-3 filter
    x2 = x.clone()
    x2[:, 3] += 1.0
    assert not torch.allclose(m(x2)[:, :3], m(x)[:, :3])  # bidirectional: everything may change


def test_clear_errors():
    with pytest.raises(ValueError, match="kernel_size"):
        RCMHAttention(8, 2, kernel_size=0)
    with pytest.raises(ValueError, match="n_heads"):
        RCMHAttention(9, 2)
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="rel"):
        relative_attention(q, q, q, torch.randn(2, 4, 4), torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="u"):
        relative_attention(q, q, q, torch.randn(2, 5, 4), torch.zeros(4), torch.zeros(2, 4))


def test_registered():
    from attnlab.mechanisms import MECHANISMS

    assert MECHANISMS["rcmha"] is RCMHAttention
