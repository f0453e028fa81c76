"""SEA vs a float64 dense masked softmax on the same estimated top-k selection; the kernel estimate itself."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab import reference
from attnlab.mechanisms import MECHANISMS
from attnlab.mechanisms.sea import SEAAttention, estimate_attention, estimator_loss, sea_attention


def _kth_mask(est, topk, causal):
    """Re-statement: a key is kept when its estimate is among the row's topk largest visible ones."""
    nq, nk = est.shape[-2:]
    visible = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq) if causal else torch.ones(nq, nk, dtype=torch.bool)
    vals = est.masked_fill(~visible, -1.0)
    kth = vals.sort(-1, descending=True).values[..., topk - 1 : topk]
    return (vals >= kth) & visible


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 2), nq=st.integers(1, 8), nk=st.integers(1, 8), d=st.integers(1, 5),
       causal=st.booleans(), data=st.data(), seed=st.integers(0, 2**16))
def test_matches_dense_masked_float64_with_same_selection(b, h, nq, nk, d, causal, data, seed):
    topk = data.draw(st.integers(1, nk))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, h, nk, d, generator=g, dtype=torch.float64) for _ in range(2))
    est = estimate_attention(q, k, torch.randn(16, d, generator=g, dtype=torch.float64), causal=causal)
    want = reference.attention(q, k, v, mask=_kth_mask(est, topk, causal))
    torch.testing.assert_close(sea_attention(q, k, v, est, topk=topk, causal=causal), want)


@pytest.mark.parametrize("causal", [False, True])
def test_estimate_approaches_softmax_with_many_features(causal):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 10, 4, generator=g, dtype=torch.float64) * 0.7 for _ in range(2))
    est = estimate_attention(q, k, torch.randn(20000, 4, generator=g, dtype=torch.float64), causal=causal)
    s = q @ k.transpose(-1, -2) / math.sqrt(4)
    if causal:
        s = s.masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), -torch.inf)
    exact = torch.softmax(s, -1)
    torch.testing.assert_close(est.sum(-1), torch.ones(1, 2, 10, dtype=torch.float64))
    assert (est - exact).abs().max() < 0.06 and (est - exact).abs().mean() < 0.01
    assert (est.masked_fill(exact > 0, 0) == 0).all()  # never any weight on hidden keys


def test_module_exposes_map_is_causal_and_seeded():
    torch.manual_seed(0)
    m = SEAAttention(12, 3, causal=True, topk=3, seed=5).double().eval()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    y = m(x)
    torch.testing.assert_close(m.estimated_map(x), m.last_estimate)
    assert m.last_estimate.shape == (2, 3, 9, 9) and (m.last_estimate.triu(1) == 0).all()
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 3, 12, dtype=torch.float64)
    torch.testing.assert_close(m(x2)[:, :6], y[:, :6])
    assert not torch.allclose(m(x2)[:, 6:], y[:, 6:])
    torch.manual_seed(1)
    again = SEAAttention(12, 3, causal=True, topk=3, seed=5).double().eval()
    again.load_state_dict(m.state_dict())
    torch.testing.assert_close(again(x), y)
    assert torch.equal(SEAAttention(12, 3, seed=5).features, m.features.float())
    assert not torch.equal(SEAAttention(12, 3, seed=6).features, m.features.float())


def test_estimator_learns_through_the_aux_loss():
    torch.manual_seed(0)
    m = SEAAttention(16, 2, topk=4, n_features=16).train()
    x = torch.randn(4, 12, 16) * 2
    opt = torch.optim.Adam([m.est_q.weight, m.est_k.weight], lr=3e-2)

    def loss_now():
        with torch.no_grad():
            q, k = (t.view(4, 12, 2, 8).transpose(1, 2) for t in (m.q_proj(x), m.k_proj(x)))
            return estimator_loss(q, k, m.estimated_map(x)).item()

    start = loss_now()
    for _ in range(25):
        opt.zero_grad()
        m(x).sum().mul(0).backward()
        opt.step()
    assert loss_now() < 0.8 * start


def test_gradients_cross_and_registry():
    assert MECHANISMS["sea"] is SEAAttention
    m = SEAAttention(8, 2, topk=2)
    x = torch.randn(1, 5, 8, requires_grad=True)
    m(x).square().sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad.abs().sum() > 0 for p in m.parameters())
    assert m(x, torch.randn(1, 9, 8)).shape == (1, 5, 8) and m(torch.randn(1, 1, 8)).shape == (1, 1, 8)


def test_clear_errors():
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match="topk"):
        sea_attention(q, q, q, torch.rand(1, 1, 4, 4), topk=5)
    with pytest.raises(ValueError, match="topk"):
        SEAAttention(8, 2, topk=0)


def test_causal_estimate_of_the_past_ignores_a_huge_future_key():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 8, 4, generator=g), torch.randn(1, 1, 8, 4, generator=g)
    w = torch.randn(32, 4, generator=g)
    k[:, :, -1] *= 40  # exp of its features dwarfs the others' in float32
    full = estimate_attention(q, k, w, causal=True)
    torch.testing.assert_close(full[..., :-1, :-1], estimate_attention(q[:, :, :-1], k[:, :, :-1], w, causal=True))
    assert torch.isfinite(full).all() and (full[..., :-1, :-1].sum(-1) > 0.99).all()
