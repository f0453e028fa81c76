"""Sparsifiner vs a float64 dense masked softmax on the same predicted top-k connectivity."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab import reference
from attnlab.mechanisms import MECHANISMS
from attnlab.mechanisms.sparsifiner import (SparsifinerAttention, attach_aux_loss, connectivity_loss,
                                            sparsifiner_attention)


def _topk_rows(scores, topk, causal):
    """Re-statement: per row, the topk highest-scoring visible keys (fewer where fewer are visible)."""
    nq, nk = scores.shape[-2:]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for idx in torch.cartesian_prod(*(torch.arange(s) for s in scores.shape[:-1])):
        i = idx[-1].item()
        visible = [j for j in range(nk) if not causal or j <= i + nk - nq]
        best = sorted(visible, key=lambda j: -scores[tuple(idx)][j].item())[:topk]
        mask[tuple(idx)][best] = True
    return mask


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 2), nq=st.integers(1, 7), nk=st.integers(1, 7), d=st.integers(1, 5),
       r=st.integers(1, 3), causal=st.booleans(), data=st.data(), seed=st.integers(0, 2**16))
def test_matches_dense_masked_float64_with_same_selection(b, h, nq, nk, d, r, causal, data, seed):
    topk = data.draw(st.integers(1, nk))
    g = torch.Generator().manual_seed(seed)
    q, ql = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64), torch.randn(b, h, nq, r, generator=g, dtype=torch.float64)
    k, v, kl = (torch.randn(b, h, nk, x, generator=g, dtype=torch.float64) for x in (d, d, r))
    out, mask = sparsifiner_attention(q, k, v, ql, kl, topk=topk, causal=causal)
    assert torch.equal(mask, _topk_rows(ql @ kl.transpose(-1, -2), topk, causal))
    torch.testing.assert_close(out, reference.attention(q, k, v, mask=mask))


def test_causal_module_ignores_future_and_keeps_budget():
    torch.manual_seed(0)
    m = SparsifinerAttention(12, 3, causal=True, keep_rate=0.5).double()
    x = torch.randn(2, 8, 12, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(2, 3, 12, dtype=torch.float64)
    torch.testing.assert_close(m(x2)[:, :5], m(x)[:, :5])
    assert not torch.allclose(m(x2)[:, 5:], m(x)[:, 5:])
    counts = m.last_mask.sum(-1)  # (B, H, N): min(4, i + 1) keys per query
    assert torch.equal(counts, torch.arange(1, 9).clamp(max=4).expand_as(counts))


def test_predictor_learns_the_attention_map_through_the_aux_loss():
    torch.manual_seed(0)
    m = SparsifinerAttention(16, 2, keep_rate=0.25).train()
    x = torch.randn(4, 16, 16)
    opt = torch.optim.Adam([m.q_low.weight, m.k_low.weight], lr=5e-2)

    def loss_now():
        q, k = (t.view(4, 16, 2, 8).transpose(1, 2) for t in (m.q_proj(x), m.k_proj(x)))
        return connectivity_loss(q, k, m.q_low(q), m.k_low(k)).item()

    start = loss_now()
    for _ in range(25):
        opt.zero_grad()
        m(x).sum().mul(0).backward()  # the output's own loss is zero: only the aux loss trains the predictor
        opt.step()
    assert loss_now() < 0.7 * start
    m.eval().zero_grad()
    m(x).sum().backward()
    assert m.q_low.weight.grad is None or m.q_low.weight.grad.abs().sum() == 0  # eval: the mask is not differentiated


def test_attach_aux_loss_is_identity_forward():
    out, w = torch.randn(3, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    y = attach_aux_loss(out, w.square())
    assert torch.equal(y, out)
    y.sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor(4.0))
    torch.testing.assert_close(out.grad, torch.ones(3))


def test_gradients_cross_and_registry():
    assert MECHANISMS["sparsifiner"] is SparsifinerAttention
    m = SparsifinerAttention(8, 2)
    x = torch.randn(1, 5, 8, requires_grad=True)
    m(x).square().sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad.abs().sum() > 0 for p in m.parameters())
    assert m(x, torch.randn(1, 9, 8)).shape == (1, 5, 8)
    assert m(torch.randn(1, 1, 8)).shape == (1, 1, 8)


def test_clear_errors():
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match="topk"):
        sparsifiner_attention(q, q, q, q, q, topk=5)
    with pytest.raises(ValueError, match="keep_rate"):
        SparsifinerAttention(8, 2, keep_rate=0)
    with pytest.raises(ValueError, match="reduce"):
        SparsifinerAttention(8, 2, reduce=3)
