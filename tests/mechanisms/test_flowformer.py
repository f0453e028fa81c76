"""Flow-Attention (paper 33) vs its equations written with the explicit (N, M) flow matrix, float64."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.mechanisms.flowformer import FlowAttention, flow_attention


def _plain(q, k, v, causal):
    """The paper's equations on the dense flow matrix A = phi(Q) phi(K)^T (features given)."""
    a = q @ k.transpose(-1, -2)  # (B, H, N, M)
    n, m = a.shape[-2:]
    if not causal:
        inc, out = a.sum(-1), a.sum(-2)
        cin = (a / out.unsqueeze(-2)).sum(-1)
        cout = (a / inc.unsqueeze(-1)).sum(-2).clamp(-1, 1)
        comp = torch.softmax(cout, -1) * m
        alloc = torch.sigmoid(cin * n / m)
        return alloc.unsqueeze(-1) * ((a * comp.unsqueeze(-2)) @ v) / inc.unsqueeze(-1)
    t = torch.arange(1, n + 1, dtype=a.dtype)
    low = torch.ones(n, n, dtype=torch.bool).tril()  # [i, j]: j <= i
    a_src = a * low  # sink i sees sources j <= i
    # source t's outgoing flow runs over sinks i <= t: the same triangle read from the source side
    inc = a_src.sum(-1) / t
    out = (k @ q.transpose(-1, -2) * low).sum(-1) / t  # (B, H, M): phi(K_t) . sum_{i<=t} phi(Q_i)
    cin = (a_src / out.unsqueeze(-2)).sum(-1) / t
    cout = ((k @ q.transpose(-1, -2) * low) / inc.unsqueeze(-2)).sum(-1) / t
    cout = cout.clamp(-1, 1)
    w = torch.exp(cout)
    comp = torch.stack([w[..., j] / w[..., : j + 1].sum(-1) * (j + 1) for j in range(n)], -1)
    alloc = torch.sigmoid(cin)
    return alloc.unsqueeze(-1) * ((a_src * comp.unsqueeze(-2)) @ v) / (inc * t).unsqueeze(-1)


def _features(g, b, h, n, d):
    return torch.sigmoid(torch.randn(b, h, n, d, generator=g, dtype=torch.float64) * 2)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(1, 20), m=st.integers(1, 20), d=st.integers(1, 6),
       causal=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_float64_restatement(b, h, n, m, d, causal, seed):
    g = torch.Generator().manual_seed(seed)
    m = n if causal else m
    q, k = _features(g, b, h, n, d), _features(g, b, h, m, d)
    v = torch.randn(b, h, m, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(flow_attention(q, k, v, causal=causal, eps=0.0), _plain(q, k, v, causal))


def test_default_eps_is_a_small_perturbation():
    g = torch.Generator().manual_seed(3)
    q, k, v = _features(g, 1, 2, 30, 8), _features(g, 1, 2, 30, 8), torch.randn(1, 2, 30, 4, generator=g).double()
    for causal in (False, True):
        want = _plain(q, k, v, causal)
        torch.testing.assert_close(flow_attention(q, k, v, causal=causal), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cross", [False, True])
def test_module_matches_restatement(cross):
    torch.manual_seed(0)
    m = FlowAttention(12, 3).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    ctx = torch.randn(2, 10, 12, dtype=torch.float64) if cross else None
    src = x if ctx is None else ctx
    split = lambda t: t.view(2, -1, 3, 4).transpose(1, 2)
    q, k, v = split(torch.sigmoid(m.q_proj(x))), split(torch.sigmoid(m.k_proj(src))), split(m.v_proj(src))
    want = m.o_proj(_plain(q, k, v, False).transpose(1, 2).reshape(2, 7, 12))
    torch.testing.assert_close(m(x, ctx), want, rtol=1e-5, atol=1e-6)


def test_causal_module_ignores_the_future_and_grads_flow():
    torch.manual_seed(0)
    m = FlowAttention(8, 2, causal=True)
    x = torch.randn(2, 70, 8, requires_grad=True)  # > one lightning block: the tiled path runs
    y = m(x)
    x2 = x.detach().clone()
    x2[:, 40:] = torch.randn(2, 30, 8)
    torch.testing.assert_close(m(x2)[:, :40], y[:, :40])
    assert not torch.allclose(m(x2)[:, 40:], y[:, 40:])
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_length_one_and_extreme_features_finite():
    m = FlowAttention(8, 2, causal=True)
    assert m(torch.randn(3, 1, 8)).shape == (3, 1, 8)
    q = torch.zeros(1, 1, 5, 4)  # all-zero features: eps keeps every division finite
    assert torch.isfinite(flow_attention(q, q, torch.randn(1, 1, 5, 2))).all()
    assert torch.isfinite(flow_attention(q, q, torch.randn(1, 1, 5, 2), causal=True)).all()


def test_errors():
    with pytest.raises(ValueError, match="n_heads"):
        FlowAttention(10, 3)
    with pytest.raises(ValueError, match="eps"):
        FlowAttention(8, 2, eps=-1.0)
    with pytest.raises(ValueError, match="context"):
        FlowAttention(8, 2, causal=True)(torch.randn(1, 3, 8), context=torch.randn(1, 4, 8))
    q = torch.rand(1, 2, 5, 4)
    with pytest.raises(ValueError, match="Nq == Nk"):
        flow_attention(q, torch.rand(1, 2, 6, 4), torch.rand(1, 2, 6, 4), causal=True)
    with pytest.raises(ValueError, match="k"):
        flow_attention(q, torch.rand(1, 3, 5, 4), q)
