"""Sigmoid attention (paper 47) vs a float64 loop re-statement of sum_j sigmoid(q_i.k_j/sqrt(d) + b) v_j."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.mechanisms.sigmoid import SigmoidAttention, sigmoid_attention


def _plain(q, k, v, causal, bias=0.0, normalize=False):
    """Per (b, h, i): weights w_j = sigmoid(q_i.k_j / sqrt(d) + bias) for visible j, out = sum_j w_j v_j."""
    q, k, v = q.detach(), k.detach(), v.detach()
    b, h, nq, d = q.shape
    nk, groups = k.shape[2], h // k.shape[1]
    out = torch.zeros(b, h, nq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kh, vh = k[bi, hi // groups], v[bi, hi // groups]
            for i in range(nq):
                js = [j for j in range(nk) if not causal or j <= i + nk - nq]
                w = [1 / (1 + math.exp(-(float(q[bi, hi, i] @ kh[j]) / math.sqrt(d) + bias))) for j in js]
                total = sum(w) if normalize and w else 1.0
                for wj, j in zip(w, js):
                    out[bi, hi, i] += wj / total * vh[j]
    return out


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), groups=st.integers(1, 2), nq=st.integers(1, 7),
       nk=st.integers(1, 7), d=st.integers(1, 6), causal=st.booleans(), normalize=st.booleans(),
       bias=st.sampled_from([0.0, -1.5]), seed=st.integers(0, 2**16))
def test_function_matches_float64_loop(b, hkv, groups, nq, nk, d, causal, normalize, bias, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * groups, nq, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64) for _ in range(2))
    got = sigmoid_attention(q, k, v, causal=causal, bias=bias, normalize=normalize)
    torch.testing.assert_close(got, _plain(q, k, v, causal, bias, normalize))


@pytest.mark.parametrize("causal,normalize", [(True, False), (True, True), (False, False)])
def test_query_chunks_match_float64_loop(monkeypatch, causal, normalize):
    import attnlab.mechanisms.sigmoid as mod

    monkeypatch.setattr(mod, "CHUNK", 3)  # 8 queries in chunks of 3, 3, 2
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 8, 4, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 1, 6, 4, generator=g, dtype=torch.float64) for _ in range(2))
    got = mod.sigmoid_attention(q, k, v, causal=causal, normalize=normalize)
    torch.testing.assert_close(got, _plain(q, k, v, causal, normalize=normalize))


def test_rows_are_not_normalised_and_fully_masked_rows_are_zero():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 5, 4, dtype=torch.float64), torch.randn(1, 2, 3, 4, dtype=torch.float64)
    ones = torch.ones(1, 2, 3, 1, dtype=torch.float64)
    mass = sigmoid_attention(q, k, ones, causal=True).squeeze(-1)  # (1, 2, 5): each row's total weight
    assert (mass[..., :2] == 0).all()  # Nq > Nk: the first two queries see no key
    assert not torch.allclose(mass[..., 2:], torch.ones_like(mass[..., 2:]))  # free total mass
    torch.testing.assert_close(sigmoid_attention(q, k, ones, causal=True, normalize=True).squeeze(-1)[..., 2:],
                               torch.ones(1, 2, 3, dtype=torch.float64))


@pytest.mark.parametrize("cross", [False, True])
def test_module_matches_restatement_and_is_causal(cross):
    torch.manual_seed(1)
    m = SigmoidAttention(12, 3, causal=True, bias=-0.5).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    ctx = torch.randn(2, 9, 12, dtype=torch.float64) if cross else None
    src = x if ctx is None else ctx
    split = lambda t: t.view(2, -1, 3, 4).transpose(1, 2)  # noqa: E731
    want = _plain(split(m.q_proj(x)), split(m.k_proj(src)), split(m.v_proj(src)), True, bias=-0.5)
    torch.testing.assert_close(m(x, ctx), m.o_proj(want.transpose(1, 2).reshape(2, 7, 12)))
    if not cross:
        x2 = x.clone()
        x2[:, 4:] = torch.randn(2, 3, 12, dtype=torch.float64)
        torch.testing.assert_close(m(x2)[:, :4], m(x)[:, :4])
        assert not torch.allclose(m(x2)[:, 4:], m(x)[:, 4:])


def test_gradients_flow():
    m = SigmoidAttention(8, 2, causal=True)
    x = torch.randn(1, 5, 8, requires_grad=True)
    m(x).square().sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_clear_errors():
    with pytest.raises(ValueError, match="n_heads"):
        SigmoidAttention(10, 3)
    with pytest.raises(ValueError, match="bias"):
        SigmoidAttention(8, 2, bias="log")
    with pytest.raises(ValueError, match="k"):
        sigmoid_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5), torch.randn(1, 2, 3, 4))


def test_registered():
    from attnlab.mechanisms import MECHANISMS

    assert MECHANISMS["sigmoid"] is SigmoidAttention
