"""Combiner-Fixed vs a float64 re-statement of its factorised attention matrix, entry by entry."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.mechanisms import MECHANISMS
from attnlab.mechanisms.combiner import CombinerAttention, combiner_attention


def _combiner_matrix(q, k, span, causal):
    """P (N, N) for one head: p(j | i) on the own span, p(r | i) q(j | r) elsewhere, from the paper's equation."""
    n, d = q.shape
    scale = 1 / math.sqrt(d)
    spans = [range(r * span, (r + 1) * span) for r in range(n // span)]
    p = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        own = i // span
        direct = [j for j in spans[own] if not causal or j <= i]
        others = [r for r in range(len(spans)) if r != own and (not causal or r < own)]
        logits = {("tok", j): q[i] @ k[j] * scale for j in direct}
        for r in others:
            k_r = k[list(spans[r])].mean(0)
            logits[("span", r)] = q[i] @ k_r * scale + math.log(span)
        z = torch.logsumexp(torch.stack(list(logits.values())), 0)
        for (kind, x), s in logits.items():
            if kind == "tok":
                p[i, x] = torch.exp(s - z)
            else:
                idx = list(spans[x])
                inner = torch.softmax(torch.stack([q[idx].mean(0) @ k[j] * scale for j in idx]), 0)
                p[i, idx] = torch.exp(s - z) * inner
    return p


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 2), s=st.integers(1, 4), span=st.integers(1, 4), d=st.integers(1, 5),
       causal=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_float64_factorised_matrix(b, h, s, span, d, causal, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s * span, d, generator=g, dtype=torch.float64) for _ in range(3))
    out = combiner_attention(q, k, v, span=span, causal=causal)
    for bi in range(b):
        for hi in range(h):
            p = _combiner_matrix(q[bi, hi], k[bi, hi], span, causal)
            torch.testing.assert_close(p.sum(-1), torch.ones(s * span, dtype=torch.float64))
            visible = torch.ones_like(p, dtype=torch.bool).tril() if causal else torch.ones_like(p, dtype=torch.bool)
            assert (p[visible] > 0).all() and (p[~visible] == 0).all()  # full attention support, nothing more
            torch.testing.assert_close(out[bi, hi], p @ v[bi, hi])


def test_causal_module_ignores_future():
    torch.manual_seed(0)
    m = CombinerAttention(12, 3, causal=True, span=3).double()
    x = torch.randn(2, 12, 12, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 7:] = torch.randn(2, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(m(x2)[:, :7], m(x)[:, :7])
    assert not torch.allclose(m(x2)[:, 7:], m(x)[:, 7:])


def test_one_span_is_plain_softmax_and_length_one():
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64) for _ in range(3))
    want = torch.softmax(q @ k.transpose(-1, -2) / 2, -1) @ v
    torch.testing.assert_close(combiner_attention(q, k, v, span=6), want)
    torch.testing.assert_close(combiner_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], span=1, causal=True), v[:, :, :1])


def test_gradients_and_registry():
    assert MECHANISMS["combiner"] is CombinerAttention
    m = CombinerAttention(8, 2, span=2)
    x = torch.randn(1, 6, 8, requires_grad=True)
    m(x).square().sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad.abs().sum() > 0 for p in m.parameters())


def test_clear_errors():
    with pytest.raises(ValueError, match="span"):
        CombinerAttention(8, 2, span=4)(torch.randn(1, 6, 8))
    with pytest.raises(ValueError, match="span"):
        CombinerAttention(8, 2, span=0)
    with pytest.raises(ValueError, match="context"):
        CombinerAttention(8, 2, span=2)(torch.randn(1, 6, 8), torch.randn(1, 4, 8))
