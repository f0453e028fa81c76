"""Positional attention (paper 42) vs a float64 re-statement of softmax((P W_Q)(P W_K)^T / sqrt(d)) X W_V."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.mechanisms.positional import PositionalAttention, positional_attention, sinusoidal_positions


def _plain_weights(p_q, p_k, causal):
    """(H, Nq, Nk) softmax over visible keys of p_q . p_k / sqrt(d); rows with no visible key are zeros."""
    h, nq, d = p_q.shape
    nk = p_k.shape[1]
    a = torch.zeros(h, nq, nk, dtype=torch.float64)
    for hi in range(h):
        for i in range(nq):
            js = [j for j in range(nk) if not causal or j <= i + nk - nq]
            if not js:
                continue
            s = torch.stack([p_q[hi, i] @ p_k[hi, j] / math.sqrt(d) for j in js])
            a[hi, i, js] = torch.softmax(s, 0)
    return a


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), nq=st.integers(1, 8), nk=st.integers(1, 8),
       d=st.integers(1, 6), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_function_matches_float64_restatement(b, h, nq, nk, d, causal, seed):
    g = torch.Generator().manual_seed(seed)
    p_q = torch.randn(h, nq, d, generator=g, dtype=torch.float64)
    p_k = torch.randn(h, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, nk, d + 1, generator=g, dtype=torch.float64)
    want = torch.einsum("hqk,bhkd->bhqd", _plain_weights(p_q, p_k, causal), v)
    torch.testing.assert_close(positional_attention(p_q, p_k, v, causal=causal), want)


def test_sinusoidal_positions_formula():
    enc = sinusoidal_positions(5, 6, dtype=torch.float64)
    for pos in range(5):
        for i in range(3):
            angle = pos / 10000 ** (2 * i / 6)
            assert enc[pos, 2 * i].item() == pytest.approx(math.sin(angle))
            assert enc[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle))


@pytest.mark.parametrize("positions", ["sinusoidal", "learned", "onehot"])
@pytest.mark.parametrize("cross", [False, True])
def test_module_matches_restatement(positions, cross):
    """Head h: A_h = softmax((P W_Q^h + b)(P W_K^h + c)^T / sqrt(d_pos)), out = concat_h A_h (x W_V^h) W_O."""
    torch.manual_seed(0)
    m = PositionalAttention(12, 3, causal=True, positions=positions, max_len=16).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    ctx = torch.randn(2, 9, 12, dtype=torch.float64) if cross else None
    src = x if ctx is None else ctx
    nk, dp = src.shape[1], m.d_pos
    with torch.no_grad():
        if positions == "onehot":
            p_q, p_k = torch.eye(16, dtype=torch.float64)[:7], torch.eye(16, dtype=torch.float64)[:nk]
        elif positions == "sinusoidal":
            p_q = sinusoidal_positions(7, dp, dtype=torch.float64)
            p_k = sinusoidal_positions(nk, dp, dtype=torch.float64)
        else:
            p_q, p_k = m.table[:7], m.table[:nk]
        heads = []
        for h in range(3):
            rows = slice(h * dp, (h + 1) * dp)
            q = p_q @ m.q_proj.weight[rows].T + m.q_proj.bias[rows]
            k = p_k @ m.k_proj.weight[rows].T + m.k_proj.bias[rows]
            a = _plain_weights(q[None], k[None], True)[0]  # (Nq, Nk), the same for every batch row
            v = src @ m.v_proj.weight[4 * h: 4 * h + 4].T + m.v_proj.bias[4 * h: 4 * h + 4]
            heads.append(a @ v)
        want = torch.cat(heads, -1) @ m.o_proj.weight.T + m.o_proj.bias
        torch.testing.assert_close(m(x, ctx), want)


def test_weights_ignore_the_input_and_future():
    torch.manual_seed(0)
    m = PositionalAttention(8, 2, causal=True).double()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 3:] = torch.randn(1, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(m(x2)[:, :3], m(x)[:, :3])  # causal: the past is unchanged
    assert not torch.allclose(m(x2)[:, 3:], m(x)[:, 3:])
    # The weights never see x, so the layer is affine in x (softmax attention is not): with the
    # output of x = 0 as the offset, out(x + y) - out(0) = (out(x) - out(0)) + (out(y) - out(0)).
    y, zero = torch.randn(1, 6, 8, dtype=torch.float64), torch.zeros(1, 6, 8, dtype=torch.float64)
    torch.testing.assert_close(m(x + y) - m(zero), (m(x) - m(zero)) + (m(y) - m(zero)))


def test_gradients_flow():
    for positions in ("sinusoidal", "learned", "onehot"):
        m = PositionalAttention(8, 2, causal=True, positions=positions, max_len=8)
        x = torch.randn(2, 5, 8, requires_grad=True)
        m(x).square().sum().backward()
        assert x.grad.abs().sum() > 0
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters()
                   if n != "table"), [n for n, p in m.named_parameters() if p.grad is None]
        if positions == "learned":  # rows past the sequence get no gradient, used rows do
            assert m.table.grad[:5].abs().sum() > 0 and m.table.grad[5:].abs().sum() == 0


def test_clear_errors():
    with pytest.raises(ValueError, match="positions"):
        PositionalAttention(8, 2, positions="rope")
    with pytest.raises(ValueError, match="d_pos"):
        PositionalAttention(8, 2, d_pos=3)
    with pytest.raises(ValueError, match="max_len"):
        PositionalAttention(8, 2, positions="learned", max_len=4)(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="max_len"):
        PositionalAttention(8, 2, positions="onehot", max_len=4)(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="d_pos"):
        PositionalAttention(8, 2, positions="onehot", max_len=4, d_pos=8)
    with pytest.raises(ValueError, match="p_q"):
        positional_attention(torch.randn(1, 2, 3, 4), torch.randn(2, 3, 4), torch.randn(1, 2, 3, 4))


def test_registered():
    from attnlab.mechanisms import MECHANISMS

    assert MECHANISMS["positional"] is PositionalAttention
