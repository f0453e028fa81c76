"""The exact chunked path (attnlab.hf.chunked) against the float64 reference on random shapes."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.core import reference
from attnlab.hf.chunked import chunked_attention
from attnlab.interventions.base import Modifier
from attnlab.probes.base import CallContext, Observer


class Rows(Observer):
    def __init__(self):
        self.parts = []

    def observe(self, ctx, q_start, probs):
        self.parts.append((q_start, probs.clone()))

    def full(self):
        return torch.cat([p for _, p in sorted(self.parts, key=lambda x: x[0])], dim=2)


class Temperature(Modifier):
    def __init__(self, t):
        self.t = t

    def modify_scores(self, ctx, q_start, scores):
        return scores / self.t


def _ctx(n_q, n_kv):
    return CallContext(layer=0, n_layers=1, module=torch.nn.Identity(), n_q=n_q, n_kv=n_kv,
                       q_positions=torch.arange(n_kv - n_q, n_kv), causal=True)


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 2), h_kv=st.integers(1, 3), g=st.integers(1, 3), n_q=st.integers(1, 13),
    extra_kv=st.integers(0, 9), d=st.sampled_from([4, 8]), d_v=st.sampled_from([4, 6]),
    chunk=st.integers(1, 16), causal=st.booleans(), masked=st.booleans(), biased=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_float64_reference(b, h_kv, g, n_q, extra_kv, d, d_v, chunk, causal, masked, biased, seed):
    gen = torch.Generator().manual_seed(seed)
    n_kv = n_q + extra_kv
    h = h_kv * g
    q = torch.randn(b, h, n_q, d, generator=gen)
    k = torch.randn(b, h_kv, n_kv, d, generator=gen)
    v = torch.randn(b, h_kv, n_kv, d_v, generator=gen)
    allowed = torch.rand(b, 1, n_q, n_kv, generator=gen) > 0.4 if masked else None
    if masked:
        allowed[0, 0, 0] = False  # a fully masked row must give zeros
    bias = torch.randn(b, h, n_q, n_kv, generator=gen) if biased else None
    offset = n_kv - n_q if causal else None
    want_mask = torch.ones(b, 1, n_q, n_kv, dtype=torch.bool) if allowed is None else allowed.clone()
    if causal:
        want_mask &= torch.arange(n_kv)[None, :] <= torch.arange(n_q)[:, None] + offset
    obs = Rows()
    got = chunked_attention(q, k, v, _ctx(n_q, n_kv), allowed=allowed, causal_offset=offset, bias=bias,
                            scaling=0.3, observers=[obs], chunk=chunk)
    score_mod = (lambda s, *_: s + bias.double()) if biased else None
    want = reference.attention(q, k, v, mask=want_mask, scale=0.3, score_mod=score_mod)
    assert got.dtype == torch.float32 and got.shape == (b, h, n_q, d_v)
    assert (got.double() - want).abs().max().item() < 1e-5
    # The observer saw every row once, exactly the reference probabilities, full width.
    probs = obs.full()
    assert probs.shape == (b, h, n_q, n_kv)
    assert [q0 for q0, _ in obs.parts] == list(range(0, n_q, chunk))
    assert (probs[~want_mask.expand_as(probs)] == 0).all()
    sums = probs.sum(-1)
    visible = want_mask.expand_as(probs).any(-1)
    assert torch.allclose(sums[visible], torch.ones(()), atol=1e-5) and (sums[~visible] == 0).all()


def test_score_modifier_sees_full_width_and_cannot_unmask():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)

    class Unmask(Modifier):
        widths = []

        def modify_scores(self, ctx, q_start, scores):
            Unmask.widths.append(scores.shape[-1])
            return torch.zeros_like(scores)  # tries to make everything equally visible

    obs = Rows()
    out = chunked_attention(q, k, v, _ctx(5, 5), causal_offset=0, scaling=0.5, observers=[obs],
                            modifiers=[Unmask()], chunk=2)
    assert Unmask.widths == [5, 5, 5]
    tril = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    want = tril / tril.sum(-1, keepdim=True)  # uniform over the visible keys only
    assert torch.allclose(obs.full()[0, 0], want.float())
    assert torch.allclose(out, want.float() @ v, atol=1e-6)


def test_temperature_modifier_matches_scaled_reference():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    got = chunked_attention(q, k, v, _ctx(6, 9), causal_offset=3, scaling=0.25, modifiers=[Temperature(2.0)], chunk=4)
    mask = torch.arange(9)[None, :] <= torch.arange(6)[:, None] + 3
    want = reference.attention(q, k, v, mask=mask, scale=0.125)
    assert (got.double() - want).abs().max().item() < 1e-5


def test_nothing_visible_gives_zeros():
    q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    obs = Rows()
    allowed = torch.zeros(1, 1, 3, 4, dtype=torch.bool)
    out = chunked_attention(q, k, v, _ctx(3, 4), allowed=allowed, scaling=1.0, observers=[obs], chunk=2)
    assert (out == 0).all() and (obs.full() == 0).all() and obs.full().shape == (1, 1, 3, 4)


def test_gradients_match_the_reference():
    torch.manual_seed(2)
    q = torch.randn(1, 4, 5, 8, dtype=torch.float64)
    k, v = torch.randn(1, 2, 7, 8, dtype=torch.float64), torch.randn(1, 2, 7, 8, dtype=torch.float64)
    allowed = torch.rand(1, 1, 5, 7) > 0.3
    allowed[0, 0, 1] = False
    mask = allowed & (torch.arange(7)[None, :] <= torch.arange(5)[:, None] + 2)
    grads = []
    for fn in (
        lambda q, k, v: chunked_attention(q, k, v, _ctx(5, 7), allowed=allowed, causal_offset=2, scaling=0.5, chunk=2),
        lambda q, k, v: reference.attention(q, k, v, mask=mask, scale=0.5),
    ):
        leaves = [t.clone().float().requires_grad_() for t in (q, k, v)]
        fn(*leaves).double().pow(2).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        assert torch.isfinite(got).all() and (got - want).abs().max().item() < 1e-4


def test_row_whose_allowed_keys_are_all_in_its_future_is_zero():
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    allowed = torch.tensor([[True, False, False], [False, False, True], [True, True, True]])[None, None]
    obs = Rows()
    out = chunked_attention(q, k, v, _ctx(3, 3), allowed=allowed, causal_offset=0, scaling=1.0, observers=[obs])
    mask = allowed & torch.tril(torch.ones(3, 3, dtype=torch.bool))
    assert (out[0, 0, 1] == 0).all() and (obs.full()[0, 0, 1] == 0).all()
    assert (out.double() - reference.attention(q, k, v, mask=mask, scale=1.0)).abs().max().item() < 1e-6


class LogProbs(Observer):
    """Records log p as offered by the fast causal path (chunk_logits - chunk_log_norm) where p > 0."""

    narrow_ok = True

    def __init__(self):
        self.parts = []

    def observe(self, ctx, q_start, probs):
        assert ctx.chunk_logits is not None, "the plain causal path must offer the chunk's logits"
        logp = ctx.chunk_logits[..., : probs.shape[-1]] - ctx.chunk_log_norm[..., None]
        self.parts.append((q_start, probs.clone(), torch.where(probs > 0, logp, 0.0)))


@settings(max_examples=40, deadline=None)
@given(
    h_kv=st.integers(1, 3), g=st.integers(1, 3), n=st.integers(1, 40), chunk=st.integers(1, 16),
    sunk=st.booleans(), seed=st.integers(0, 2**16),
)
def test_offered_log_probs_match_reference(h_kv, g, n, chunk, sunk, seed):
    # sunk: key 0 and each row's own key get ~zero probability, so the row's log-sum-exp cannot be
    # read off them and the full logsumexp fallback must give the same log p.
    gen = torch.Generator().manual_seed(seed)
    h = h_kv * g
    q, k, v = (torch.randn(1, hh, n, 8, generator=gen) for hh in (h, h_kv, h_kv))
    bias = torch.zeros(1, h, n, n)
    if sunk:
        bias[..., 0] = -200.0
        bias[..., torch.arange(n), torch.arange(n)] = -200.0
    obs = LogProbs()
    chunked_attention(q, k, v, _ctx(n, n), causal_offset=0, bias=bias, scaling=0.5, observers=[obs], chunk=chunk)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    s = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) * 0.5 + bias.double()
    want = torch.log_softmax(s.masked_fill(~mask, float("-inf")), -1)
    for q0, probs, logp in obs.parts:
        rows = slice(q0, q0 + probs.shape[-2])
        w = probs.shape[-1]
        ref = want[:, :, rows, :w]
        assert torch.allclose(probs.double(), ref.exp(), atol=1e-6)
        seen = probs > 1e-30
        assert (logp.double()[seen] - ref[seen]).abs().max() < 1e-4
