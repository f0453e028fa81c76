"""HiLo attention (paper 24) vs a float64 re-statement with windows and window means written out."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.mechanisms.hilo import HiLoAttention, hifi_attention, lofi_attention, window_pool


def _window_ids(grid, window):
    """(N,) window index of each token and the list of token indices per window (row-major windows).

    ``window`` is an int or one side per axis, each clipped to the grid."""
    n = math.prod(grid)
    i = torch.arange(n)
    wy, wx = (window, window) if isinstance(window, int) else (window[0], window[-1])
    wy, wx = min(wy, grid[0]), min(wx, grid[-1])
    if len(grid) == 1:
        ids = i // wy
    else:
        ids = (i // grid[1]) // wy * (-(-grid[1] // wx)) + (i % grid[1]) // wx
    return ids, [torch.nonzero(ids == w).flatten() for w in range(int(ids.max()) + 1)]


def _softmax_attn(q, k, v, allowed):
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return p @ v


def _plain(m, x, grid, causal):
    """The layer written out: Hi-Fi inside windows, Lo-Fi over explicit window means."""
    b, n, _ = x.shape
    ids, members = _window_ids(grid, m.window)
    i = torch.arange(n)
    parts = []
    if m.hi_heads:
        split = lambda t: t.view(b, n, m.hi_heads, -1).transpose(1, 2)
        q, k, v = (split(t) for t in m.h_qkv(x).chunk(3, -1))
        allowed = ids.view(-1, 1) == ids.view(1, -1)
        if causal:
            allowed &= i.view(-1, 1) >= i.view(1, -1)
        o = _softmax_attn(q, k, v, allowed)
        parts.append(m.h_proj(o.transpose(1, 2).reshape(b, n, -1)))
    if m.lo_heads:
        means = torch.stack([x[:, idx].mean(1) for idx in members], 1)  # (B, M, C)
        split = lambda t: t.view(b, t.shape[1], m.lo_heads, -1).transpose(1, 2)
        q = split(m.l_q(x))
        k, v = (split(t) for t in m.l_kv(means).chunk(2, -1))
        allowed = torch.ones(n, len(members), dtype=torch.bool)
        if causal:
            ends = torch.tensor([int(idx.max()) for idx in members])
            full = torch.tensor([len(idx) == min(m.window, n) for idx in members])
            allowed = (ends.view(1, -1) <= i.view(-1, 1)) & full
        o = _softmax_attn(q, k, v, allowed)
        parts.append(m.l_proj(o.transpose(1, 2).reshape(b, n, -1)))
    return torch.cat(parts, -1)


grids = st.sampled_from([None, (1, 1), (2, 3), (4, 4), (5, 3), (3, 7)])


@settings(max_examples=30, deadline=None)
@given(grid=grids, n1d=st.integers(1, 20), heads=st.integers(1, 4), alpha=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
       window=st.integers(1, 4), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_module_matches_float64_restatement(grid, n1d, heads, alpha, window, causal, seed):
    causal = causal and grid is None
    torch.manual_seed(seed)
    m = HiLoAttention(4 * heads, heads, alpha=alpha, window=window, grid=grid, causal=causal).double()
    n = n1d if grid is None else grid[0] * grid[1]
    x = torch.randn(2, n, 4 * heads, dtype=torch.float64)
    torch.testing.assert_close(m(x), _plain(m, x, grid or (n,), causal))


def test_head_split_follows_alpha():
    m = HiLoAttention(64, 8, alpha=0.9)
    assert (m.lo_heads, m.hi_heads) == (7, 1)
    assert HiLoAttention(64, 8, alpha=0.5, window=1).lo_heads == 8  # window 1: all Lo-Fi (as LITv2)
    assert HiLoAttention(64, 8, alpha=0.0).hi_heads == 8


def test_window_pool_is_window_mean():
    x = torch.arange(2 * 15 * 1, dtype=torch.float64).view(1, 15, 2)
    _, members = _window_ids((3, 5), 2)
    want = torch.stack([x[:, idx].mean(1) for idx in members], 1)
    torch.testing.assert_close(window_pool(x, (3, 5), 2), want)


@pytest.mark.slow  # compiles FlexAttention for the 2-D blocked pattern on CPU (~45 s)
def test_functions_on_a_large_grid_match_restatement():
    """Big enough that attnlab.attention leaves the dense-mask path (no gradients: its own choice)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 1024, 8, generator=g) for _ in range(3))
    ids, members = _window_ids((32, 32), 4)
    want = _softmax_attn(q.double(), k.double(), v.double(), ids.view(-1, 1) == ids.view(1, -1))
    got = hifi_attention(q, k, v, grid=(32, 32), window=4)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    kp, vp = k[:, :, :64], v[:, :, :64]
    want = _softmax_attn(q.double(), kp.double(), vp.double(), torch.ones(1024, 64, dtype=torch.bool))
    torch.testing.assert_close(lofi_attention(q, kp, vp, grid=(32, 32), window=4).double(), want, rtol=1e-4, atol=1e-5)


def test_causal_module_ignores_the_future_and_grads_flow():
    torch.manual_seed(0)
    m = HiLoAttention(16, 4, causal=True, alpha=0.5, window=4)
    x = torch.randn(2, 40, 16, requires_grad=True)
    y = m(x)
    x2 = x.detach().clone()
    x2[:, 25:] = torch.randn(2, 15, 16)
    torch.testing.assert_close(m(x2)[:, :25], y[:, :25])
    assert not torch.allclose(m(x2)[:, 25:], y[:, 25:])
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_errors():
    with pytest.raises(ValueError, match="n_heads"):
        HiLoAttention(10, 3)
    with pytest.raises(ValueError, match="alpha"):
        HiLoAttention(8, 2, alpha=1.5)
    with pytest.raises(ValueError, match="window"):
        HiLoAttention(8, 2, window=0)
    with pytest.raises(ValueError, match="grid"):
        HiLoAttention(8, 2, grid=(4,))
    with pytest.raises(ValueError, match="causal"):
        HiLoAttention(8, 2, grid=(2, 2), causal=True)
    with pytest.raises(ValueError, match="grid"):
        HiLoAttention(8, 2, grid=(2, 3))(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="context"):
        HiLoAttention(8, 2)(torch.randn(1, 3, 8), context=torch.randn(1, 4, 8))
