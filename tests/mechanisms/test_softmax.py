"""Softmax attention module vs a float64 re-statement of softmax(q k^T / sqrt(d)) v."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.mechanisms import MECHANISMS, SoftmaxAttention, softmax_attention


def _plain(q, k, v, causal):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        nq, nk = s.shape[-2:]
        keep = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)  # bottom-right aligned
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), nq=st.integers(1, 9), nk=st.integers(1, 9),
       d=st.integers(1, 8), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_function_matches_float64_restatement(b, h, nq, nk, d, causal, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for n in (nq, nk, nk))
    torch.testing.assert_close(softmax_attention(q, k, v, causal=causal), _plain(q, k, v, causal))


@pytest.mark.parametrize("cross", [False, True])
def test_module_matches_restatement_and_is_causal(cross):
    torch.manual_seed(0)
    m = SoftmaxAttention(12, 3, causal=True).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    ctx = torch.randn(2, 9, 12, dtype=torch.float64) if cross else None
    src = x if ctx is None else ctx
    split = lambda t: t.view(2, -1, 3, 4).transpose(1, 2)
    want = _plain(split(m.q_proj(x)), split(m.k_proj(src)), split(m.v_proj(src)), True)
    want = m.o_proj(want.transpose(1, 2).reshape(2, 7, 12))
    torch.testing.assert_close(m(x, ctx), want)
    if not cross:
        x2 = x.clone()
        x2[:, 4:] = torch.randn(2, 3, 12, dtype=torch.float64)
        torch.testing.assert_close(m(x2)[:, :4], m(x)[:, :4])
        assert not torch.allclose(m(x2)[:, 4:], m(x)[:, 4:])


def test_gradients_flow_and_registry():
    assert MECHANISMS["softmax"] is SoftmaxAttention
    m = SoftmaxAttention(8, 2)
    x = torch.randn(1, 5, 8, requires_grad=True)
    m(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_bad_heads():
    with pytest.raises(ValueError, match="n_heads"):
        SoftmaxAttention(10, 3)
