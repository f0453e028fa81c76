"""MoH (paper 12) vs a float64 per-token re-statement of its two-stage routing and weighted sum of heads."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.mechanisms.moh import MoHAttention, moh_attention, moh_gates


def _softmax(vals):
    e = [math.exp(v - max(vals)) for v in vals]
    return [x / sum(e) for x in e]


def _plain_gates(x, w_r, w_s, w_m, n_shared, top_k):
    """Token by token: shared weights S*softmax(W_s x), routed top-k of softmax(W_r x) renormalised x k,
    both groups scaled by 2*softmax(W_h x); aux = R^2 * mean_r(fraction routed to r * mean prob of r)."""
    b, n, _ = x.shape
    n_routed = 0 if w_r is None else w_r.shape[0]
    gates = torch.zeros(b, n, n_shared + n_routed, dtype=torch.float64)
    frac, prob = [0.0] * n_routed, [0.0] * n_routed
    for bi in range(b):
        for t in range(n):
            xt = x[bi, t]
            shared = [1.0] * n_shared if w_s is None else [n_shared * p for p in _softmax((w_s @ xt).tolist())]
            routed = []
            if n_routed:
                p = _softmax((w_r @ xt).tolist())
                top = sorted(range(n_routed), key=lambda r: -p[r])[:top_k]
                total = sum(p[r] for r in top)
                routed = [p[r] / total * top_k if r in top else 0.0 for r in range(n_routed)]
                for r in range(n_routed):
                    frac[r] += (r in top) / (b * n)
                    prob[r] += p[r] / (b * n)
            if n_shared and n_routed:
                a_s, a_r = (2 * m for m in _softmax((w_m @ xt).tolist()))
                shared, routed = [a_s * g for g in shared], [a_r * g for g in routed]
            gates[bi, t] = torch.tensor(shared + routed, dtype=torch.float64)
    aux = sum(f * p for f, p in zip(frac, prob)) / n_routed * n_routed**2 if n_routed else 0.0
    return gates, aux


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 2), n=st.integers(1, 6), d=st.integers(2, 6),
       split=st.sampled_from([(0, 3, 1), (0, 3, 3), (1, 3, 2), (2, 2, 1), (3, 0, 0), (2, 4, 4), (1, 0, 0)]),
       seed=st.integers(0, 2**16))
def test_gates_match_float64_restatement(b, n, d, split, seed):
    n_shared, n_routed, top_k = split
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    w_r = torch.randn(n_routed, d, generator=g, dtype=torch.float64) if n_routed else None
    w_s = torch.randn(n_shared, d, generator=g, dtype=torch.float64) if n_shared > 1 else None
    w_m = torch.randn(2, d, generator=g, dtype=torch.float64) if n_shared and n_routed else None
    gates, aux = moh_gates(x, w_r, w_s, w_m, n_shared=n_shared, top_k=top_k)
    want_gates, want_aux = _plain_gates(x, w_r, w_s, w_m, n_shared, top_k)
    torch.testing.assert_close(gates, want_gates)
    assert float(aux) == pytest.approx(want_aux, rel=1e-9, abs=1e-12)
    assert ((gates[..., n_shared:] > 0).sum(-1) == top_k).all()  # exactly k routed heads per token


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), nq=st.integers(1, 7), nk=st.integers(1, 7),
       d=st.integers(1, 5), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_attention_is_gated_softmax_per_head(b, h, nq, nk, d, causal, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, h, nk, d, generator=g, dtype=torch.float64) for _ in range(2))
    gates = torch.rand(b, nq, h, generator=g, dtype=torch.float64)
    want = torch.zeros(b, h, nq, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(nq):
                js = [j for j in range(nk) if not causal or j <= i + nk - nq]
                if js:
                    w = torch.softmax(torch.stack([q[bi, hi, i] @ k[bi, hi, j] for j in js]) / math.sqrt(d), 0)
                    want[bi, hi, i] = gates[bi, i, hi] * (w @ v[bi, hi, js])
    torch.testing.assert_close(moh_attention(q, k, v, gates, causal=causal), want)


@pytest.mark.parametrize("cross", [False, True])
def test_module_is_weighted_sum_of_head_outputs(cross):
    """MoH(x) = sum_h g_h(x) * head_h(x) W_O^h: the paper's summation form, head by head."""
    torch.manual_seed(0)
    m = MoHAttention(12, 4, causal=True, n_shared=1, top_k=2).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    ctx = torch.randn(2, 7, 12, dtype=torch.float64) if cross else None
    src = x if ctx is None else ctx
    with torch.no_grad():
        gates, _ = _plain_gates(x, m.router.weight, None, m.mix_router.weight, 1, 2)
        want = torch.zeros(2, 5, 12, dtype=torch.float64)
        for h in range(4):
            rows = slice(3 * h, 3 * h + 3)
            q = (x @ m.q_proj.weight[rows].T).unsqueeze(1)
            k, v = (src @ m.k_proj.weight[rows].T).unsqueeze(1), (src @ m.v_proj.weight[rows].T).unsqueeze(1)
            head = moh_attention(q, k, v, torch.ones(2, 5, 1, dtype=torch.float64), causal=True)[:, 0]
            want += gates[..., h:h + 1] * head @ m.o_proj.weight[:, rows].T
        torch.testing.assert_close(m(x, ctx), want)


def test_causal_gradients_and_aux_loss():
    torch.manual_seed(0)
    m = MoHAttention(16, 4, causal=True)  # 2 shared + top-1 of 2 routed
    x = torch.randn(2, 6, 16, requires_grad=True)
    x2 = x.detach().clone()
    x2[:, 4:] += 1.0
    torch.testing.assert_close(m(x2)[:, :4], m(x)[:, :4])
    y = m(x)
    assert m.aux_loss.dim() == 0 and m.aux_loss > 0 and m.aux_loss.requires_grad
    (y.square().sum() + m.aux_loss).backward()
    assert x.grad.abs().sum() > 0
    missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_load_balance_loss_is_minimal_when_balanced():
    """With uniform router probabilities and every head chosen equally often, aux = k (its minimum)."""
    x = torch.eye(4, dtype=torch.float64).unsqueeze(0)  # 4 tokens, one-hot
    w_r = torch.eye(4, dtype=torch.float64) * 5  # token t prefers routed head t
    _, aux = moh_gates(x, w_r, None, None, n_shared=0, top_k=1)
    assert float(aux) == pytest.approx(1.0)
    every_token_prefers_head_0 = torch.zeros(4, 4, dtype=torch.float64)
    every_token_prefers_head_0[0] = 5.0
    _, skewed = moh_gates(x, every_token_prefers_head_0, None, None, n_shared=0, top_k=1)
    assert float(skewed) > 3.0


def test_clear_errors():
    with pytest.raises(ValueError, match="top_k"):
        MoHAttention(16, 4, n_shared=2, top_k=3)  # top-k > routed heads
    with pytest.raises(ValueError, match="top_k"):
        MoHAttention(16, 4, n_shared=2, top_k=0)
    with pytest.raises(ValueError, match="top_k"):
        MoHAttention(16, 4, n_shared=4, top_k=1)
    with pytest.raises(ValueError, match="n_shared"):
        MoHAttention(16, 4, n_shared=5)
    with pytest.raises(ValueError, match="aux_coef"):
        MoHAttention(16, 4, aux_coef=-1)
    with pytest.raises(ValueError, match="gates"):
        moh_attention(*(torch.randn(1, 2, 3, 4),) * 3, torch.ones(1, 2, 3))


def test_registered():
    from attnlab.mechanisms import MECHANISMS

    assert MECHANISMS["moh"] is MoHAttention
