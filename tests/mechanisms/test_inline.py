"""InLine attention (paper 22) vs its weight matrix and local window written out in float64."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.mechanisms.inline import InLineAttention, inline_attention, local_residual


def _weights(q, k, causal, scale):
    """InL weights w_ij = c (q_i.k_j - mean_s q_i.k_s) + 1/N over visible keys, as an (N, M) matrix."""
    s = q @ k.transpose(-1, -2)  # (B, H, N, M)
    n, m = s.shape[-2:]
    if not causal:
        return (s - s.mean(-1, keepdim=True)) * (scale / m) + 1.0 / m
    w = torch.zeros_like(s)
    for i in range(n):
        row = s[..., i, : i + 1]
        w[..., i, : i + 1] = (row - row.mean(-1, keepdim=True)) * (scale / (i + 1)) + 1.0 / (i + 1)
    return w


def _residual_matrix(taps, grid, causal):
    """R[b, c, i, j]: the residual weight of token j for token i (zero-padded windows)."""
    b, c = taps.shape[:2] if not causal else (taps.shape[0], taps.shape[2])
    n = math.prod(grid)
    ks = taps.shape[-1]
    r = torch.zeros(b, c, n, n, dtype=taps.dtype)
    for i in range(n):
        if causal:
            for t in range(ks):
                j = i - (ks - 1) + t
                if j >= 0:
                    r[:, :, i, j] = taps[:, i, :, t]
            continue
        coords = [i] if len(grid) == 1 else [i // grid[1], i % grid[1]]
        offsets = [range(ks)] * len(grid)
        for tap in torch.cartesian_prod(*[torch.tensor(o) for o in offsets]).view(-1, len(grid)).tolist():
            pos = [x - ks // 2 + t for x, t in zip(coords, tap)]
            if all(0 <= p < g for p, g in zip(pos, grid)):
                j = pos[0] if len(grid) == 1 else pos[0] * grid[1] + pos[1]
                r[:, :, i, j] = taps[(slice(None), slice(None), *tap)]
    return r


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(1, 16), m=st.integers(1, 16), d=st.integers(1, 6),
       causal=st.booleans(), seed=st.integers(0, 2**16))
def test_attention_matches_float64_weights(b, h, n, m, d, causal, seed):
    g = torch.Generator().manual_seed(seed)
    m = n if causal else m
    q, k = (torch.randn(b, h, x, d, generator=g, dtype=torch.float64) for x in (n, m))
    v = torch.randn(b, h, m, 3, generator=g, dtype=torch.float64)
    w = _weights(q, k, causal, d**-0.5)
    torch.testing.assert_close(inline_attention(q, k, v, causal=causal), w @ v)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))  # the paper's normalisation


def test_injective_where_plain_linear_attention_is_not():
    """Queries q and 2q: plain (divided) linear attention gives equal weights, InLine does not."""
    g = torch.Generator().manual_seed(0)
    k = torch.rand(1, 1, 6, 4, generator=g, dtype=torch.float64)
    q = torch.rand(1, 1, 1, 4, generator=g, dtype=torch.float64)
    qq = torch.cat([q, 2 * q], 2)
    plain = qq @ k.transpose(-1, -2)
    plain = plain / plain.sum(-1, keepdim=True)
    torch.testing.assert_close(plain[..., 0, :], plain[..., 1, :])
    w = _weights(qq, k, False, 0.5)
    assert not torch.allclose(w[..., 0, :], w[..., 1, :])


@settings(max_examples=25, deadline=None)
@given(grid=st.sampled_from([(1,), (5,), (9,), (1, 1), (3, 4), (4, 2)]), ks=st.sampled_from([1, 2, 3, 5]),
       causal=st.booleans(), seed=st.integers(0, 2**16))
def test_local_residual_matches_window_matrix(grid, ks, causal, seed):
    if causal and len(grid) == 2:
        return
    g = torch.Generator().manual_seed(seed)
    n = math.prod(grid)
    v = torch.randn(2, n, 3, generator=g, dtype=torch.float64)
    shape = (2, n, 3, ks) if causal else (2, 3, *[ks] * len(grid))
    taps = torch.randn(*shape, generator=g, dtype=torch.float64)
    want = (_residual_matrix(taps, grid, causal) @ v.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
    torch.testing.assert_close(local_residual(v, taps, grid, causal=causal), want)


@pytest.mark.parametrize("grid,causal", [((3, 4), False), (None, False), (None, True)])
def test_module_matches_restatement(grid, causal):
    torch.manual_seed(0)
    m = InLineAttention(12, 3, grid=grid, causal=causal).double()
    x = torch.randn(2, 12, 12, dtype=torch.float64)
    split = lambda t: t.view(2, -1, 3, 4).transpose(1, 2)
    q, k, v = split(m.q_proj(x)), split(m.k_proj(x)), split(m.v_proj(x))
    attn = (_weights(q, k, causal, 0.5) @ v).transpose(1, 2).reshape(2, 12, 12)
    vt = m.v_proj(x)
    if causal:
        mean = torch.stack([x[:, : i + 1].mean(1) for i in range(12)], 1)  # (B, N, C)
        taps = m.residual(mean.reshape(24, 12, 1)).view(2, 12, 12, 3)
    else:
        taps = m.residual(x.mean(1).unsqueeze(-1)).view(2, 12, *([3] * (1 if grid is None else 2)))
    r = _residual_matrix(taps, grid or (12,), causal)
    res = (r @ vt.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
    torch.testing.assert_close(m(x), m.o_proj(attn + res))


def test_causal_module_ignores_the_future_and_grads_flow():
    torch.manual_seed(0)
    m = InLineAttention(8, 2, causal=True)
    x = torch.randn(2, 80, 8, requires_grad=True)
    y = m(x)
    x2 = x.detach().clone()
    x2[:, 50:] = torch.randn(2, 30, 8)
    torch.testing.assert_close(m(x2)[:, :50], y[:, :50])
    assert not torch.allclose(m(x2)[:, 50:], y[:, 50:])
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_length_one():
    for causal in (False, True):
        assert InLineAttention(8, 2, causal=causal)(torch.randn(3, 1, 8)).shape == (3, 1, 8)
    assert InLineAttention(8, 2, grid=(1, 1))(torch.randn(3, 1, 8)).shape == (3, 1, 8)


def test_errors():
    with pytest.raises(ValueError, match="n_heads"):
        InLineAttention(10, 3)
    with pytest.raises(ValueError, match="grid"):
        InLineAttention(8, 2, grid=(4,))
    with pytest.raises(ValueError, match="causal"):
        InLineAttention(8, 2, grid=(2, 2), causal=True)
    with pytest.raises(ValueError, match="kernel_size"):
        InLineAttention(8, 2, kernel_size=0)
    with pytest.raises(ValueError, match="grid"):
        InLineAttention(8, 2, grid=(2, 3))(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="context"):
        InLineAttention(8, 2)(torch.randn(1, 3, 8), context=torch.randn(1, 4, 8))
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="Nq == Nk"):
        inline_attention(q, torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), causal=True)
    with pytest.raises(ValueError, match="scale"):
        inline_attention(q, q, q, scale=-1.0)
