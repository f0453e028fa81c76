"""Wide attention (paper 39) vs a float64 re-statement: concat_h softmax(x Wq_h (x Wk_h)^T / sqrt(d)) x Wv_h, Wo."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.mechanisms.wide import WideAttention, wide_attention, wide_vs_deep


def _head(q, k, v, causal):
    """One head, float64: q (Nq, D), k/v (Nk, D); rows that see no key are zeros."""
    nq, nk = q.shape[0], k.shape[0]
    out = torch.zeros(nq, v.shape[1], dtype=torch.float64)
    for i in range(nq):
        js = [j for j in range(nk) if not causal or j <= i + nk - nq]
        if js:
            w = torch.softmax(torch.stack([q[i] @ k[j] for j in js]) / math.sqrt(q.shape[1]), 0)
            out[i] = sum(wj * v[j] for wj, j in zip(w, js))
    return out


def _module_plain(m, x, ctx, causal):
    """Each head h uses its own (d_model -> head_dim) slice of the projections; heads concatenated, then Wo."""
    src = x if ctx is None else ctx
    hd = m.head_dim
    heads = []
    for h in range(m.n_heads):
        rows = slice(h * hd, (h + 1) * hd)
        wq, wk, wv = m.q_proj.weight[rows], m.k_proj.weight[rows], m.v_proj.weight[rows]
        heads.append(torch.stack([_head(x[b] @ wq.T, src[b] @ wk.T, src[b] @ wv.T, causal) for b in range(x.shape[0])]))
    return torch.cat(heads, -1) @ m.o_proj.weight.T


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), nq=st.integers(1, 7), nk=st.integers(1, 7),
       d=st.integers(1, 6), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_function_matches_float64_restatement(b, h, nq, nk, d, causal, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, h, nk, d, generator=g, dtype=torch.float64) for _ in range(2))
    want = torch.stack([torch.stack([_head(q[i, j], k[i, j], v[i, j], causal) for j in range(h)]) for i in range(b)])
    torch.testing.assert_close(wide_attention(q, k, v, causal=causal), want)


@pytest.mark.parametrize("cross,causal,head_dim", [(False, True, None), (True, False, None), (True, True, 5),
                                                  (False, False, 3)])
def test_module_matches_restatement(cross, causal, head_dim):
    torch.manual_seed(0)
    m = WideAttention(6, 4, causal=causal, head_dim=head_dim).double()
    assert m.head_dim == (6 if head_dim is None else head_dim)  # default: every head is d_model wide
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    ctx = torch.randn(2, 8, 6, dtype=torch.float64) if cross else None
    with torch.no_grad():
        torch.testing.assert_close(m(x, ctx), _module_plain(m, x, ctx, causal))


def test_causal_and_gradients():
    torch.manual_seed(0)
    m = WideAttention(8, 3, causal=True)
    x = torch.randn(1, 6, 8, requires_grad=True)
    x2 = x.detach().clone()
    x2[:, 4:] += 1.0
    torch.testing.assert_close(m(x2)[:, :4], m(x)[:, :4])
    m(x).square().sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_wide_vs_deep_configs():
    cfgs = wide_vs_deep(12, (1, 2, 3, 6))
    assert [c["n_layers"] * c["n_heads"] for c in cfgs] == [12] * 4
    assert cfgs[0] == {"mechanism": "wide", "n_layers": 1, "n_heads": 12}
    # Same total heads: every depth has the same number of attention parameters.
    counts = {sum(p.numel() for p in WideAttention(8, c["n_heads"]).parameters()) * c["n_layers"] for c in cfgs}
    assert len(counts) == 1


def test_clear_errors():
    with pytest.raises(ValueError, match="depths"):
        wide_vs_deep(12, (5,))
    with pytest.raises(ValueError, match="total_heads"):
        wide_vs_deep(0)
    with pytest.raises(ValueError, match="head_dim"):
        WideAttention(8, 2, head_dim=0)
    with pytest.raises(ValueError, match="n_heads"):
        WideAttention(8, 0)


def test_registered():
    from attnlab.mechanisms import MECHANISMS

    assert MECHANISMS["wide"] is WideAttention
