"""Routing Transformer attention vs a float64 dense masked softmax with the same k-means clusters."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab import reference
from attnlab.mechanisms import MECHANISMS
from attnlab.mechanisms.routing import RoutingAttention, ema_update, routing_attention, routing_mask


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), nq=st.integers(1, 9), nk=st.integers(1, 9), d=st.integers(1, 6),
       causal=st.booleans(), data=st.data(), seed=st.integers(0, 2**16))
def test_matches_dense_masked_float64_with_same_clusters(b, h, nq, nk, d, causal, data, seed):
    c = data.draw(st.integers(1, nk))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, h, nk, d, generator=g, dtype=torch.float64) for _ in range(2))
    cent = torch.randn(h, c, d, generator=g, dtype=torch.float64)
    # Clusters re-stated: nearest unit centroid by cosine similarity.
    cq = (F.normalize(q, dim=-1) @ F.normalize(cent, dim=-1).transpose(-1, -2)).argmax(-1)
    ck = (F.normalize(k, dim=-1) @ F.normalize(cent, dim=-1).transpose(-1, -2)).argmax(-1)
    mask = cq[..., :, None] == ck[..., None, :]
    if causal:
        mask &= torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
        if nq == nk:
            mask |= torch.eye(nq, dtype=torch.bool)
    assert torch.equal(routing_mask(q, k, cent, causal=causal), mask)
    torch.testing.assert_close(routing_attention(q, k, v, cent, causal=causal), reference.attention(q, k, v, mask=mask))


def test_causal_module_ignores_future_and_selection_is_seeded():
    torch.manual_seed(0)
    m = RoutingAttention(12, 3, causal=True, n_clusters=3, seed=7).double().eval()
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, 12, dtype=torch.float64)
    torch.testing.assert_close(m(x2)[:, :6], m(x)[:, :6])
    assert not torch.allclose(m(x2)[:, 6:], m(x)[:, 6:])
    same = RoutingAttention(12, 3, n_clusters=3, seed=7)
    other = RoutingAttention(12, 3, n_clusters=3, seed=8)
    assert torch.equal(same.centroids, m.centroids.float()) and not torch.equal(other.centroids, same.centroids)


def test_ema_moves_centroids_toward_their_members_in_training_only():
    cent = F.normalize(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), dim=-1)  # (H=1, C=2, D=2)
    x = torch.tensor([[[[1.0, 0.2], [1.0, 0.4], [0.1, 1.0]]]])  # (B=1, H=1, N=3, D=2)
    new = ema_update(cent, x, decay=0.5)
    unit = F.normalize(x[0, 0], dim=-1)
    want0 = F.normalize(0.5 * cent[0, 0] + 0.5 * unit[:2].mean(0), dim=-1)
    want1 = F.normalize(0.5 * cent[0, 1] + 0.5 * unit[2], dim=-1)
    torch.testing.assert_close(new[0], torch.stack([want0, want1]))
    m = RoutingAttention(8, 2, n_clusters=2)
    before = m.centroids.clone()
    m.eval()(torch.randn(1, 6, 8))
    assert torch.equal(m.centroids, before)
    m.train()(torch.randn(1, 6, 8))
    assert not torch.equal(m.centroids, before)
    torch.testing.assert_close(m.centroids.norm(dim=-1), torch.ones(2, 2))


def test_gradients_cross_and_registry():
    assert MECHANISMS["routing"] is RoutingAttention
    m = RoutingAttention(8, 2, n_clusters=1)  # one cluster: dense attention, every weight gets a gradient
    x = torch.randn(1, 5, 8, requires_grad=True)
    m(x).square().sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad.abs().sum() > 0 for p in m.parameters())
    assert m(x, torch.randn(1, 7, 8)).shape == (1, 5, 8)


def test_clear_errors():
    with pytest.raises(ValueError, match="n_clusters"):
        RoutingAttention(8, 2, n_clusters=6)(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="n_clusters"):
        RoutingAttention(8, 2, n_clusters=0)
    with pytest.raises(ValueError, match="decay"):
        RoutingAttention(8, 2, decay=1.0)


def test_masked_attention_empty_rows_are_zero_with_finite_gradients():
    from attnlab.mechanisms.routing import masked_attention
    q, k, v = (torch.randn(1, 1, 3, 4, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[True, False, False], [False, False, False], [True, True, False]])
    out = masked_attention(q, k, v, mask)
    assert (out[0, 0, 1] == 0).all()
    torch.testing.assert_close(out.double(), reference.attention(q, k, v, mask=mask), atol=1e-6, rtol=1e-5)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v)) and (q.grad[0, 0, 1] == 0).all()
