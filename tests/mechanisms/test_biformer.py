"""Bi-level routing attention (BiFormer) vs a float64 dense masked softmax with the same routed regions."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab import reference
from attnlab.mechanisms import MECHANISMS
from attnlab.mechanisms.biformer import (BiLevelRoutingAttention, bilevel_routing_attention, route_causal,
                                         route_regions, selection_mask)


def _split(t, h):
    b, n, _ = t.shape
    return t.view(b, n, h, -1).transpose(1, 2)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 2), s=st.integers(1, 4), rq=st.integers(1, 3), rk=st.integers(1, 3),
       d=st.integers(1, 6), causal=st.booleans(), data=st.data(), seed=st.integers(0, 2**16))
def test_gathered_attention_matches_dense_masked_float64(b, h, s, rq, rk, d, causal, data, seed):
    topk = data.draw(st.integers(1, s))
    rk = rq if causal else rk
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s * rq, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, h, s * rk, d, generator=g, dtype=torch.float64) for _ in range(2))
    out, idx = bilevel_routing_attention(q, k, v, n_regions=s, topk=topk, causal=causal)
    want = reference.attention(q, k, v, mask=selection_mask(idx, s, s * rq, s * rk, causal=causal))
    torch.testing.assert_close(out, want)
    # The routing is the top-k of the pooled affinity: each picked region scores at least as high as any other.
    aff = q.unflatten(2, (s, rq)).mean(3) @ k.unflatten(2, (s, rk)).mean(3).transpose(-1, -2)
    if not causal:
        picked = aff.gather(-1, idx).min(-1).values
        others = aff.masked_fill(torch.zeros_like(aff, dtype=torch.bool).scatter(-1, idx, True), -torch.inf)
        assert (picked >= others.max(-1).values - 1e-12).all()


def test_two_d_regions_match_restatement():
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(8, 2, n_regions=2, topk=2, grid=(4, 6)).double()
    x = torch.randn(2, 24, 8, dtype=torch.float64)
    q, k, v = (_split(p(x), 2) for p in (m.q_proj, m.k_proj, m.v_proj))
    rows, cols = torch.arange(24) // 6, torch.arange(24) % 6
    region = (rows // 2) * 2 + cols // 3  # 2 x 2 regions of 2 x 3 tokens
    onehot = torch.nn.functional.one_hot(region, 4).double()  # (N, S)
    pool = lambda t: (onehot.T @ t) / onehot.sum(0)[:, None]
    idx = (pool(q) @ pool(k).transpose(-1, -2)).topk(2, -1).indices  # (B, H, S, 2)
    picked = torch.zeros(2, 2, 4, 4, dtype=torch.bool).scatter(-1, idx, True)
    mask = picked[:, :, region][:, :, :, region]  # (B, H, N, N)
    want = reference.attention(q, k, v, mask=mask)
    torch.testing.assert_close(m(x), m.o_proj(want.transpose(1, 2).reshape(2, 24, 8)))


def test_causal_module_ignores_future_and_sparsity():
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(12, 3, causal=True, n_regions=4, topk=2).double()
    x = torch.randn(2, 16, 12, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 9:] = torch.randn(2, 7, 12, dtype=torch.float64)
    torch.testing.assert_close(m(x2)[:, :9], m(x)[:, :9])
    assert not torch.allclose(m(x2)[:, 9:], m(x)[:, 9:])
    idx = route_causal(torch.randn(1, 1, 16, 4), torch.randn(1, 1, 16, 4), 4, 2)
    region = torch.arange(16) // 4
    assert (idx[..., 0] == region).all() and (idx[..., 1:] < region[:, None]).all()  # own, then earlier regions
    assert (idx[..., 1:4, 1] == -1).all() and (idx[..., 4:, 1] >= 0).all()
    assert selection_mask(idx, 4, 16, 16, causal=True).sum(-1).max() <= 2 * 4


def test_cross_attention_and_gradients_and_registry():
    assert MECHANISMS["biformer"] is BiLevelRoutingAttention
    m = BiLevelRoutingAttention(8, 2, n_regions=2, topk=1)
    x, ctx = torch.randn(1, 6, 8, requires_grad=True), torch.randn(1, 10, 8)
    assert m(x, ctx).shape == (1, 6, 8)
    m(x).square().sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad.abs().sum() > 0 for p in m.parameters())


def test_length_one_and_single_region():
    q, k, v = (torch.randn(1, 1, 1, 4, dtype=torch.float64) for _ in range(3))
    out, idx = bilevel_routing_attention(q, k, v, n_regions=1, topk=1, causal=True)
    torch.testing.assert_close(out, v)


def test_clear_errors():
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match="topk"):
        route_regions(q, q, 4, 5)
    with pytest.raises(ValueError, match="topk"):
        route_causal(q, q, 2, 3)
    with pytest.raises(ValueError, match="n_regions"):
        route_regions(q, q, 3, 1)
    with pytest.raises(ValueError, match="n_regions"):
        route_causal(q, q, 3, 1)
    with pytest.raises(ValueError, match="topk"):
        BiLevelRoutingAttention(8, 2, n_regions=2, topk=3)
    with pytest.raises(ValueError, match="n_regions"):
        BiLevelRoutingAttention(8, 2, n_regions=4)(torch.randn(1, 6, 8))
    with pytest.raises(ValueError, match="causal"):
        BiLevelRoutingAttention(8, 2, causal=True, grid=(4, 4))
    with pytest.raises(ValueError, match="grid"):
        BiLevelRoutingAttention(8, 2, n_regions=2, grid=(4, 4))(torch.randn(1, 15, 8))
