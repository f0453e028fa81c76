"""Lightning attention (paper 46) vs the plain O(N^2) (decayed) linear attention in float64."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.mechanisms.lightning import LightningAttention, decay_slopes, lightning_attention, running_sum


def _plain(q, k, v, causal, rates=None):
    """O = [(Q K^T) * M] V with M[t, s] = exp(-rate (t - s)) for s <= t (causal), or Q K^T V."""
    scores = q @ k.transpose(-1, -2)
    if causal:
        n = q.shape[2]
        t = torch.arange(n, dtype=torch.float64)
        dist = t.view(-1, 1) - t.view(1, -1)
        r = torch.zeros(q.shape[1], dtype=torch.float64) if rates is None else rates.double()
        m = torch.exp(-r.view(-1, 1, 1) * dist.clamp(min=0)) * (dist >= 0)
        scores = scores * m
    return scores @ v


def _qkv(g, b, h, n, m, d, dv):
    return (torch.randn(b, h, nn, dd, generator=g, dtype=torch.float64) for nn, dd in ((n, d), (m, d), (m, dv)))


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(1, 40), d=st.integers(1, 6), dv=st.integers(1, 6),
       block=st.integers(1, 17), decay=st.booleans(), seed=st.integers(0, 2**16))
def test_causal_matches_float64_restatement(b, h, n, d, dv, block, decay, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(g, b, h, n, n, d, dv)
    rates = decay_slopes(h) if decay else None
    got = lightning_attention(q, k, v, causal=True, decay=rates, block=block)
    torch.testing.assert_close(got, _plain(q, k, v, True, rates))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 12), m=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_noncausal_and_cross_match_restatement(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(g, 2, 2, n, m, 3, 5)
    torch.testing.assert_close(lightning_attention(q, k, v, causal=False), _plain(q, k, v, False))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 70), d=st.integers(1, 5), block=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_running_sum_is_cumsum(n, d, block, seed):
    x = torch.randn(2, 3, n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(running_sum(x, block), x.cumsum(2))


def test_large_decay_and_long_sequence_float32_stable():
    """Fast-decaying heads over many blocks: no overflow (only lambda^k <= 1 is ever formed)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = _qkv(g, 1, 2, 700, 700, 4, 4)
    for rates in (torch.tensor([5.0, 1e-3], dtype=torch.float64), None):  # decayed loop, and the cumsum path
        want = _plain(q, k, v, True, rates)
        got = lightning_attention(q.float(), k.float(), v.float(), causal=True, decay=rates, block=64)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)


def test_module_matches_restatement_and_is_causal():
    torch.manual_seed(0)
    m = LightningAttention(12, 3, causal=True, block=4).double()
    x = torch.randn(2, 11, 12, dtype=torch.float64)
    split = lambda t: t.view(2, -1, 3, 4).transpose(1, 2)
    q, k, v = split(F.silu(m.q_proj(x))), split(F.silu(m.k_proj(x))), split(m.v_proj(x))
    o = _plain(q, k, v, True, decay_slopes(3))
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)
    want = m.o_proj(o.transpose(1, 2).reshape(2, 11, 12) * m.u_proj(x))
    torch.testing.assert_close(m(x), want)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(m(x2)[:, :6], m(x)[:, :6])
    assert not torch.allclose(m(x2)[:, 6:], m(x)[:, 6:])


def test_noncausal_module_sees_the_future_and_grads_flow():
    torch.manual_seed(0)
    m = LightningAttention(8, 2)
    x = torch.randn(1, 9, 8, requires_grad=True)
    y = m(x)
    x2 = x.detach().clone()
    x2[:, -1] += 1.0
    assert not torch.allclose(m(x2)[:, 0], y[:, 0])
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_length_one():
    m = LightningAttention(8, 2, causal=True)
    assert m(torch.randn(3, 1, 8)).shape == (3, 1, 8)


def test_errors():
    with pytest.raises(ValueError, match="n_heads"):
        LightningAttention(10, 3)
    with pytest.raises(ValueError, match="decay"):
        LightningAttention(8, 2, causal=False, decay=True)
    with pytest.raises(ValueError, match="block"):
        LightningAttention(8, 2, block=0)
    with pytest.raises(ValueError, match="context"):
        LightningAttention(8, 2)(torch.randn(1, 3, 8), context=torch.randn(1, 4, 8))
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="Nq == Nk"):
        lightning_attention(q, torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), causal=True)
    with pytest.raises(ValueError, match="decay"):
        lightning_attention(q, q, q, causal=False, decay=decay_slopes(2))
    with pytest.raises(ValueError, match="decay"):
        lightning_attention(q, q, q, causal=True, decay=decay_slopes(3))
    with pytest.raises(ValueError, match="q"):
        lightning_attention(q[0], q, q)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_float64():
    g = torch.Generator().manual_seed(0)
    q, k, v = _qkv(g, 2, 4, 1000, 1000, 32, 32)
    rates = decay_slopes(4)
    got = lightning_attention(*(t.cuda().bfloat16() for t in (q, k, v)), causal=True, decay=rates, block=128)
    want = _plain(q, k, v, True, rates)
    assert (got.double().cpu() - want).abs().max() <= 0.02 * want.abs().max()
