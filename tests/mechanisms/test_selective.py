"""Selective attention (paper 20) vs a float64 re-statement of sum_j softmax_j(tau_q q_i.k_j / sqrt(d)) tau_v,j v_j."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.mechanisms.selective import SelectiveAttention, selective_attention, visible_keys


def _plain(q, k, v, tau_q, tau_v, causal):
    """Loops over (b, h, i): weights over the visible keys, values scaled by their own temperature."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    out = torch.zeros(b, h, nq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(nq):
                js = [j for j in range(nk) if not causal or j <= i + nk - nq]
                if js:
                    s = torch.stack([tau_q[bi, hi, i] * q[bi, hi, i] @ k[bi, hi, j] for j in js]) / math.sqrt(d)
                    w = torch.softmax(s, 0)
                    out[bi, hi, i] = sum(w[n] * tau_v[bi, hi, j] * v[bi, hi, j] for n, j in enumerate(js))
    return out


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), nq=st.integers(1, 7), nk=st.integers(1, 7),
       d=st.integers(1, 6), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_function_matches_float64_restatement(b, h, nq, nk, d, causal, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, h, nk, d, generator=g, dtype=torch.float64) for _ in range(2))
    tau_q = torch.rand(b, h, nq, generator=g, dtype=torch.float64) * 3
    tau_v = torch.rand(b, h, nk, generator=g, dtype=torch.float64) * 2
    torch.testing.assert_close(selective_attention(q, k, v, tau_q, tau_v, causal=causal),
                               _plain(q, k, v, tau_q, tau_v, causal))


def _module_plain(m, x, ctx):
    """The paper's temperatures written out per (b, h, token) from the module's parameters."""
    src = x if ctx is None else ctx
    b, n, _ = x.shape
    nk, hd = src.shape[1], m.d_model // m.n_heads
    split = lambda t: t.view(b, t.shape[1], m.n_heads, hd).transpose(1, 2)  # noqa: E731
    q, k, v = split(x @ m.q_proj.weight.T), split(src @ m.k_proj.weight.T), split(src @ m.v_proj.weight.T)
    tau_q = torch.zeros(b, m.n_heads, n, dtype=torch.float64)
    tau_v = torch.ones(b, m.n_heads, nk, dtype=torch.float64)
    for bi in range(b):
        for h in range(m.n_heads):
            for i in range(n):
                n_vis = max(1, min(nk, i + 1 + nk - n)) if m.causal else nk
                tok = q[bi, h, i] @ m.u_q[h] if m.weight_sharing else x[bi, i] @ m.f_q.weight[h]
                tau_q[bi, h, i] = 1 + torch.sigmoid(m.alpha[h]) * math.log(n_vis) + torch.tanh(tok)
            for j in range(nk):
                if m.value_temperature:
                    tok = v[bi, h, j] @ m.u_v[h] if m.weight_sharing else src[bi, j] @ m.f_v.weight[h]
                    tau_v[bi, h, j] = 1 + torch.tanh(tok)
    out = _plain(q, k, v, tau_q, tau_v, m.causal)
    return out.transpose(1, 2).reshape(b, n, m.d_model) @ m.o_proj.weight.T


@pytest.mark.parametrize("kw,cross,causal", [({}, False, True), ({"weight_sharing": False}, True, True),
                                             ({"value_temperature": False}, True, False)])
def test_module_matches_restatement(kw, cross, causal):
    torch.manual_seed(0)
    m = SelectiveAttention(12, 3, causal=causal, **kw).double()
    with torch.no_grad():  # non-zero temperature parameters, so every term of the equation is exercised
        for p in (m.alpha, getattr(m, "u_q", None), getattr(m, "u_v", None)):
            if p is not None:
                p.normal_()
        for lin in (getattr(m, "f_q", None), getattr(m, "f_v", None)):
            if lin is not None:
                lin.weight.normal_()
        x = torch.randn(2, 6, 12, dtype=torch.float64)
        ctx = torch.randn(2, 8, 12, dtype=torch.float64) if cross else None
        torch.testing.assert_close(m(x, ctx), _module_plain(m, x, ctx))


def test_position_temperature_sharpens_long_contexts():
    assert visible_keys(4, 6, causal=True).tolist() == [3, 4, 5, 6]
    assert visible_keys(5, 2, causal=True).tolist() == [0, 0, 0, 1, 2]
    assert visible_keys(3, 7, causal=False).tolist() == [7, 7, 7]
    m = SelectiveAttention(8, 2, causal=True).double()
    x = torch.randn(1, 9, 8, dtype=torch.float64)
    q = m.q_proj(x).view(1, 9, 2, 4).transpose(1, 2)
    v = m.v_proj(x).view(1, 9, 2, 4).transpose(1, 2)
    tau_q, tau_v = m.temperatures(x, q, x, v)
    assert (tau_q.diff(dim=-1) > 0).all()  # fresh layer: tau = 1 + 0.5 log(i + 1), increasing
    torch.testing.assert_close(tau_q[0, 0, -1], torch.tensor(1 + 0.5 * math.log(9), dtype=torch.float64))
    torch.testing.assert_close(tau_v, torch.ones_like(tau_v))


def test_causal_and_gradients():
    torch.manual_seed(0)
    for kw in ({}, {"weight_sharing": False}):
        m = SelectiveAttention(8, 2, causal=True, **kw)
        x = torch.randn(1, 6, 8, requires_grad=True)
        x2 = x.detach().clone()
        x2[:, 4:] += 1.0
        torch.testing.assert_close(m(x2)[:, :4], m(x)[:, :4])
        assert not torch.allclose(m(x2)[:, 4:], m(x)[:, 4:])
        m(x).square().sum().backward()
        assert x.grad.abs().sum() > 0
        missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert not missing, missing


def test_clear_errors():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="tau_q"):
        selective_attention(q, q, q, torch.ones(1, 2, 4))
    with pytest.raises(ValueError, match="tau_v"):
        selective_attention(q, q, q, torch.ones(1, 2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="n_heads"):
        SelectiveAttention(10, 3)


def test_registered():
    from attnlab.mechanisms import MECHANISMS

    assert MECHANISMS["selective"] is SelectiveAttention
