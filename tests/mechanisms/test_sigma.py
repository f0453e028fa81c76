"""Sigma DiffQKV (paper 35) vs a float64 re-statement: per query head h, K head h // (Hq/Hk), V head h // (Hq/Hv)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.mechanisms.sigma import DiffQKVAttention, diffqkv_attention, largest_divisor_at_most


def _plain(q, k, v, causal, k_up=None):
    """Loop over query heads; each picks its K and V head by GroupSharing; rows with no key are zeros."""
    b, hq, nq, _ = q.shape
    hk, hv, nk = k.shape[1], v.shape[1], k.shape[2]
    if k_up is not None:
        k = k @ k_up
    out = torch.zeros(b, hq, nq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh, vh = k[bi, h // (hq // hk)], v[bi, h // (hq // hv)]
            for i in range(nq):
                js = [j for j in range(nk) if not causal or j <= i + nk - nq]
                if js:
                    s = torch.stack([q[bi, h, i] @ kh[j] for j in js]) / math.sqrt(q.shape[-1])
                    out[bi, h, i] = torch.softmax(s, 0) @ vh[js]
    return out


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 2), heads=st.sampled_from([(4, 1, 2), (4, 2, 4), (6, 3, 2), (2, 2, 1), (1, 1, 1)]),
       nq=st.integers(1, 7), nk=st.integers(1, 7), d=st.integers(1, 5), dk=st.integers(1, 5),
       causal=st.booleans(), seed=st.integers(0, 2**16))
def test_function_matches_float64_restatement(b, heads, nq, nk, d, dk, causal, seed):
    hq, hk, hv = heads
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hk, nk, dk, generator=g, dtype=torch.float64)
    v = torch.randn(b, hv, nk, d + 2, generator=g, dtype=torch.float64)
    k_up = torch.randn(dk, d, generator=g, dtype=torch.float64)
    got = diffqkv_attention(q, k, v, causal=causal, k_up=k_up)
    torch.testing.assert_close(got, _plain(q, k, v, causal, k_up))


@pytest.mark.parametrize("kw,cross", [({}, False), ({"k_head_dim": 2, "q_aug_dim": 0}, True),
                                      ({"n_k_heads": 2, "n_v_heads": 4, "q_aug_dim": 20}, False)])
def test_module_matches_restatement(kw, cross):
    torch.manual_seed(0)
    m = DiffQKVAttention(16, 4, causal=True, **kw).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    ctx = torch.randn(2, 8, 16, dtype=torch.float64) if cross else None
    src = x if ctx is None else ctx
    with torch.no_grad():
        qx = x @ m.q_aug.weight.T if m.q_aug is not None else x  # augmented intermediate width first
        heads = lambda t, h: t.view(2, t.shape[1], h, -1).transpose(1, 2)  # noqa: E731
        q = heads(qx @ m.q_proj.weight.T, 4)
        k = heads(src @ m.k_proj.weight.T, m.n_k_heads)
        v = heads(src @ m.v_proj.weight.T, m.n_v_heads)
        k_up = m.k_up.weight.T if m.k_up is not None else None
        want = _plain(q, k, v, True, k_up).transpose(1, 2).reshape(2, 6, 16) @ m.o_proj.weight.T
        torch.testing.assert_close(m(x, ctx), want)


def test_defaults_follow_sigma_layout():
    m = DiffQKVAttention(256, 32)  # SIGMA-1.5B ratios: 32 q heads, 4 k heads, 16 v heads, q_aug 1.5x
    assert (m.n_k_heads, m.n_v_heads, m.k_head_dim, m.q_aug_dim) == (4, 16, 8, 384)
    assert m.kv_cache_per_token() == 4 * 8 + 16 * 8 < 2 * 256
    small = DiffQKVAttention(12, 6)  # 6 // 8 = 0 -> 1 key head; 6 // 2 = 3 value heads
    assert (small.n_k_heads, small.n_v_heads) == (1, 3)
    assert largest_divisor_at_most(26, 3) == 2


def test_causal_and_gradients():
    torch.manual_seed(0)
    m = DiffQKVAttention(16, 4, causal=True, k_head_dim=2)
    x = torch.randn(1, 6, 16, requires_grad=True)
    x2 = x.detach().clone()
    x2[:, 3:] += 1.0
    torch.testing.assert_close(m(x2)[:, :3], m(x)[:, :3])
    assert not torch.allclose(m(x2)[:, 3:], m(x)[:, 3:])
    m(x).square().sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_clear_errors():
    with pytest.raises(ValueError, match="n_k_heads"):
        DiffQKVAttention(16, 4, n_k_heads=3)
    with pytest.raises(ValueError, match="n_v_heads"):
        DiffQKVAttention(16, 4, n_v_heads=8)
    with pytest.raises(ValueError, match="q_aug_dim"):
        DiffQKVAttention(16, 4, q_aug_dim=-1)
    with pytest.raises(ValueError, match="k_head_dim"):
        DiffQKVAttention(16, 4, k_head_dim=0)
    with pytest.raises(ValueError, match="k_up"):
        diffqkv_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 4))
    with pytest.raises(ValueError, match="divide"):
        diffqkv_attention(torch.randn(1, 4, 3, 4), torch.randn(1, 3, 3, 4), torch.randn(1, 1, 3, 4))


def test_registered():
    from attnlab.mechanisms import MECHANISMS

    assert MECHANISMS["sigma"] is DiffQKVAttention
