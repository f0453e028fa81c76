"""CLEAR local attention (paper 31) vs softmax under the circle rule written out, in float64."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab import inverse_permutation
from attnlab.mechanisms.clear import ClearAttention, circular_window, clear_attention, clear_pattern


def _allowed(n, radius, grid, causal, n_text=0):
    """(N, N) bool: the paper's rule from token coordinates (1-D: |i - j| < r, causal j <= i);
    ``n_text`` leading tokens see and are seen by all."""
    if n_text:
        out = torch.ones(n, n, dtype=torch.bool)
        out[n_text:, n_text:] = _allowed(n - n_text, radius, grid, causal)
        return out
    i = torch.arange(n)
    if grid is None:
        d = i.view(-1, 1) - i.view(1, -1)
        return (d.abs() < radius) & ((d >= 0) if causal else True)
    y, x = i // grid[1], i % grid[1]
    return (y.view(-1, 1) - y) ** 2 + (x.view(-1, 1) - x) ** 2 < radius**2


def _plain(q, k, v, allowed):
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v


grids = st.sampled_from([None, (1, 1), (1, 5), (3, 4), (5, 5), (6, 3)])


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), grid=grids, n1d=st.integers(1, 20), radius=st.integers(1, 6),
       causal=st.booleans(), n_text=st.integers(0, 3), d=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_matches_float64_restatement(b, h, grid, n1d, radius, causal, n_text, d, seed):
    causal = causal and grid is None
    n_text = 0 if causal else n_text
    n = n_text + (n1d if grid is None else grid[0] * grid[1])
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    got = clear_attention(q, k, v, radius=radius, grid=grid, causal=causal, n_text=n_text)
    torch.testing.assert_close(got, _plain(q, k, v, _allowed(n, radius, grid, causal, n_text)))


@settings(max_examples=10, deadline=None)
@given(n_text=st.integers(1, 5), grid=st.sampled_from([None, (3, 4), (5, 5)]), radius=st.integers(1, 4))
def test_text_prefix_pattern_views_agree(n_text, grid, radius):
    m = 11 if grid is None else grid[0] * grid[1]
    p = clear_pattern(n_text + m, radius, grid=grid, n_text=n_text)
    n = n_text + m
    mask = p.mask(n, n)
    assert torch.equal(mask, _allowed(n, radius, grid, False, n_text))
    assert p.density(n, n) == pytest.approx(mask.float().mean().item())
    lay = p.block_layout(n, n, 8, 8)
    visit = (lay.full | lay.partial).repeat_interleave(8, 0).repeat_interleave(8, 1)[:n, :n]
    assert not (mask & ~visit).any()


@settings(max_examples=20, deadline=None)
@given(h=st.integers(1, 14), w=st.integers(1, 14), radius=st.integers(1, 7), block=st.sampled_from([4, 16, 32]))
def test_pattern_views_agree(h, w, radius, block):
    """mask == rule, density == mask mean, every allowed pair in a visited tile, tile order consistent."""
    p = circular_window((h, w), radius)
    n = h * w
    mask = p.mask(n, n)
    assert torch.equal(mask, _allowed(n, radius, (h, w), False))
    assert p.density(n, n) == pytest.approx(mask.float().mean().item())
    for pat, m in ((p, mask), (p.permuted(), None)):
        m = pat.mask(n, n) if m is None else m
        lay = pat.block_layout(n, n, block, block)
        visit = (lay.full | lay.partial).repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :n]
        assert not (m & ~visit).any()
    order = p.token_order(n, n)
    if order is not None:
        inv = inverse_permutation(order)
        assert torch.equal(p.permuted().mask(n, n)[inv][:, inv], mask)


@pytest.mark.parametrize("n_text", [0, 3])
def test_module_matches_restatement_on_a_grid(n_text):
    torch.manual_seed(0)
    m = ClearAttention(12, 3, radius=2, grid=(4, 5), n_text=n_text).double()
    n = 20 + n_text
    x = torch.randn(2, n, 12, dtype=torch.float64)
    split = lambda t: t.view(2, -1, 3, 4).transpose(1, 2)
    o = _plain(split(m.q_proj(x)), split(m.k_proj(x)), split(m.v_proj(x)), _allowed(n, 2, (4, 5), False, n_text))
    torch.testing.assert_close(m(x), m.o_proj(o.transpose(1, 2).reshape(2, n, 12)))


def test_causal_module_ignores_the_future_and_grads_flow():
    torch.manual_seed(0)
    m = ClearAttention(8, 2, causal=True, radius=4)
    x = torch.randn(2, 30, 8, requires_grad=True)
    y = m(x)
    x2 = x.detach().clone()
    x2[:, 20:] = torch.randn(2, 10, 8)
    torch.testing.assert_close(m(x2)[:, :20], y[:, :20])
    assert not torch.allclose(m(x2)[:, 20:], y[:, 20:])
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_large_grid_trains_on_cpu():
    """A grid big enough that attnlab.attention would pick FlexAttention (no CPU backward): the
    module's gradients still match those of the written-out rule."""
    torch.manual_seed(0)
    m = ClearAttention(8, 2, radius=3, grid=(24, 24))
    x = torch.randn(1, 576, 8, requires_grad=True)
    m(x).square().sum().backward()
    got = x.grad.clone()
    x.grad = None
    split = lambda t: t.view(1, -1, 2, 4).transpose(1, 2)
    o = _plain(split(m.q_proj(x)), split(m.k_proj(x)), split(m.v_proj(x)), _allowed(576, 3, (24, 24), False))
    m.o_proj(o.transpose(1, 2).reshape(1, 576, 8)).square().sum().backward()
    torch.testing.assert_close(got, x.grad, rtol=1e-4, atol=1e-5)


def test_large_grid_forward_matches_reference():
    """No gradients: attnlab.attention's own kernel choice (banded or FlexAttention) runs the circle."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 1024, 16, generator=g) for _ in range(3))
    got = clear_attention(q, k, v, radius=4, grid=(32, 32))
    want = _plain(q.double(), k.double(), v.double(), _allowed(1024, 4, (32, 32), False))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # compiles FlexAttention for the text-prefix pattern on CPU (~60 s on a busy machine)
def test_text_prefix_through_flex_matches_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 1040, 16, generator=g) for _ in range(3))
    got = clear_attention(q, k, v, radius=4, grid=(32, 32), n_text=16)
    want = _plain(q.double(), k.double(), v.double(), _allowed(1040, 4, (32, 32), False, 16))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="n_heads"):
        ClearAttention(10, 3)
    with pytest.raises(ValueError, match="radius"):
        ClearAttention(8, 2, radius=0)
    with pytest.raises(ValueError, match="shape"):
        ClearAttention(8, 2, grid=(4,))
    with pytest.raises(ValueError, match="causal"):
        ClearAttention(8, 2, grid=(2, 2), causal=True)
    with pytest.raises(ValueError, match="grid"):
        ClearAttention(8, 2, grid=(2, 3))(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="context"):
        ClearAttention(8, 2)(torch.randn(1, 3, 8), context=torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="n_q"):
        circular_window((3, 3), 2).mask(8, 8)
    with pytest.raises(ValueError, match="n_text"):
        ClearAttention(8, 2, causal=True, n_text=2)
    with pytest.raises(ValueError, match="n_text"):
        clear_pattern(5, 2, n_text=6)
    with pytest.raises(ValueError, match="grid"):
        ClearAttention(8, 2, grid=(2, 2), n_text=1)(torch.randn(1, 4, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("grid,causal", [((32, 32), False), (None, True)])
def test_cuda_forward_and_backward_match_restatement(grid, causal):
    """On CUDA the forward may run attnlab's Triton kernel (forward-only); with gradients the module
    must switch to a differentiable kernel and still match the rule."""
    torch.manual_seed(0)
    m = ClearAttention(16, 2, radius=3, grid=grid, causal=causal).cuda()
    x = torch.randn(2, 1024, 16, device="cuda", requires_grad=True)
    m(x).square().sum().backward()
    got = x.grad.clone()
    x.grad = None
    split = lambda t: t.view(2, -1, 2, 8).transpose(1, 2)
    allowed = _allowed(1024, 3, grid, causal).cuda()
    o = _plain(split(m.q_proj(x)), split(m.k_proj(x)), split(m.v_proj(x)), allowed)
    m.o_proj(o.transpose(1, 2).reshape(2, 1024, 16)).square().sum().backward()
    torch.testing.assert_close(got, x.grad, rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.o_proj(o.transpose(1, 2).reshape(2, 1024, 16)), rtol=1e-3, atol=1e-3)
