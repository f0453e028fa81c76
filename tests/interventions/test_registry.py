"""The intervention registry's contract, and the Modifier.score_bias hook of attach (fused-kernel logit bias)."""
from __future__ import annotations

import pytest
import torch

from attnlab.hf import attach
from attnlab.interventions import INTERVENTIONS, Intervention
from attnlab.interventions.base import Modifier, RankOneBias
from attnlab.probes.base import Observer

N_HEADS = 9


def _ids(tokenizer):
    return tokenizer("The quick brown fox jumps over the lazy dog. The dog did not mind at all.",
                     return_tensors="pt").input_ids


class Bias(Modifier):
    """score_bias: a fixed bias on some layers."""

    def __init__(self, bias: torch.Tensor, layers=(0, 4)):
        self.bias, self.on = bias, set(layers)

    def score_bias(self, ctx):
        if ctx.layer not in self.on:
            return None
        return self.bias[..., -ctx.n_q:, :ctx.n_kv] if self.bias.shape[-2] > 1 else self.bias[..., :ctx.n_kv]


class ScoresBias(Bias):
    """The same bias through modify_scores (the exact chunked path)."""

    def score_bias(self, ctx):
        return None

    def modify_scores(self, ctx, q_start, scores):
        if ctx.layer not in self.on:
            return scores
        rows = self.bias if self.bias.shape[-2] == 1 else self.bias[..., q_start:q_start + scores.shape[-2], :]
        return scores + rows[..., :scores.shape[-1]]


class Recorder(Observer):
    def __init__(self, layer):
        self.layer, self.rows = layer, []

    def observe(self, ctx, q_start, probs):
        if ctx.layer == self.layer:
            self.rows.append(probs.clone())


def _column_bias(n):
    b = torch.zeros(1, N_HEADS, 1, n)
    b[0, 2, 0, 0], b[0, 5, 0, 3], b[0, 7, 0, 1] = 1.3, -2.0, 0.7
    return b


def test_registry_entries_follow_the_contract():
    assert {"head_mask", "head_scale"} <= set(INTERVENTIONS)
    for name, entry in INTERVENTIONS.items():
        assert isinstance(entry, Intervention), name
        assert callable(entry.apply) and entry.grid and all(isinstance(g, dict) for g in entry.grid), name
        assert isinstance(entry.paper, str) and entry.description, name


@pytest.mark.parametrize("per_row", [False, True])
def test_score_bias_equals_modify_scores(smollm, per_row):
    model, tokenizer = smollm
    ids = _ids(tokenizer)
    n = ids.shape[1]
    bias = torch.randn(1, N_HEADS, n, n, generator=torch.Generator().manual_seed(0)) if per_row else _column_bias(n)
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with attach(model, modifiers=[Bias(bias)]) as att:
            fused = model(input_ids=ids).logits
            assert not att.exact  # SDPA ran
        with attach(model, modifiers=[ScoresBias(bias)]):
            exact = model(input_ids=ids).logits
        # observers force the exact path; it must add the bias too
        with attach(model, observers=[Recorder(0)], modifiers=[Bias(bias)]):
            observed = model(input_ids=ids).logits
    assert (fused - base).abs().max() > 1e-2
    torch.testing.assert_close(fused, exact, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(observed, exact, atol=2e-4, rtol=1e-4)


class RankOne(Modifier):
    """score_bias as a RankOneBias (the low-rank fused path)."""

    def __init__(self, row, col):
        self.row, self.col = row, col

    def score_bias(self, ctx):
        return RankOneBias(self.row, self.col) if ctx.layer in (0, 4) else None


def test_rank_one_bias_equals_modify_scores(smollm):
    model, tokenizer = smollm
    ids = _ids(tokenizer)
    n = ids.shape[1]
    g = torch.Generator().manual_seed(1)
    row, col = torch.randn(1, N_HEADS, n, 1, generator=g), (torch.rand(1, N_HEADS, 1, n, generator=g) < 0.3).float()
    with torch.no_grad():
        with attach(model, modifiers=[RankOne(row, col)]):
            fused = model(input_ids=ids).logits
        with attach(model, modifiers=[ScoresBias(row * col)]):
            exact = model(input_ids=ids).logits
        with attach(model, modifiers=[RankOne(row, col), Bias(_column_bias(n))]):
            both = model(input_ids=ids).logits
        with attach(model, modifiers=[ScoresBias(row * col + _column_bias(n))]):
            both_exact = model(input_ids=ids).logits
    torch.testing.assert_close(fused, exact, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(both, both_exact, atol=2e-4, rtol=1e-4)


def test_observer_sees_biased_probs(smollm):
    model, tokenizer = smollm
    ids = _ids(tokenizer)
    n = ids.shape[1]
    bias = _column_bias(n)
    plain, biased = Recorder(0), Recorder(0)
    with torch.no_grad():
        with attach(model, observers=[plain]):
            model(input_ids=ids)
        with attach(model, observers=[biased], modifiers=[Bias(bias)]):
            model(input_ids=ids)
    p, q = torch.cat(plain.rows, 2)[0], torch.cat(biased.rows, 2)[0]  # (H, N, N)
    torch.testing.assert_close(q.sum(-1), torch.ones(N_HEADS, n))
    # head 2: +1.3 on key 0 multiplies its odds by e^1.3, exactly, after renormalisation
    a0, b0 = p[2, 1:, 0].double(), q[2, 1:, 0].double()
    gamma = torch.e ** 1.3
    torch.testing.assert_close(b0, gamma * a0 / ((gamma - 1) * a0 + 1), atol=1e-5, rtol=1e-4)
    assert torch.equal(p[0], q[0])  # an unbiased head is bit-identical


def test_masked_key_stays_masked(smollm):
    model, tokenizer = smollm
    ids = _ids(tokenizer)
    n = ids.shape[1]
    pad = 3
    padded = torch.cat([torch.full((1, pad), tokenizer.pad_token_id or 0), ids], 1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(ids)], 1)
    big = torch.zeros(1, N_HEADS, 1, n + pad)
    big[..., 1] = 50.0  # a padded key: must stay invisible
    with torch.no_grad():
        ref = model(input_ids=padded, attention_mask=mask).logits[:, pad:]
        with attach(model, modifiers=[Bias(big, layers=range(30))]):
            fused = model(input_ids=padded, attention_mask=mask).logits[:, pad:]
        rec = Recorder(7)
        with attach(model, observers=[rec], modifiers=[Bias(big, layers=range(30))]):
            model(input_ids=padded, attention_mask=mask)
    torch.testing.assert_close(fused, ref, atol=2e-4, rtol=1e-4)
    probs = torch.cat(rec.rows, 2)[0]  # (H, N, N)
    assert torch.count_nonzero(probs[:, pad:, :pad]) == 0
    # a causally masked (future) key stays masked too
    assert torch.count_nonzero(probs[:, pad:, pad:].triu(1)) == 0


def test_score_bias_in_cached_decoding(smollm):
    model, tokenizer = smollm
    ids = _ids(tokenizer)
    n = ids.shape[1]
    bias = _column_bias(n)
    with torch.no_grad(), attach(model, modifiers=[Bias(bias)]):
        full = model(input_ids=ids).logits[:, -1]
        out = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], cache=out.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=2e-4, rtol=1e-4)


def test_layer_restricted_prob_modifier_keeps_sdpa_elsewhere(smollm):
    model, tokenizer = smollm
    seen = []

    class Probs(Modifier):
        layers = frozenset({3})

        def modify_probs(self, ctx, q_start, probs):
            seen.append(ctx.layer)
            return probs

    with torch.no_grad():
        base = model(input_ids=_ids(tokenizer)).logits
        with attach(model, modifiers=[Probs()]) as att:
            out = model(input_ids=_ids(tokenizer)).logits
    assert att.exact_layers == {3} and set(seen) == {3}
    torch.testing.assert_close(out, base, atol=2e-4, rtol=1e-4)


def test_bad_score_bias_is_a_clear_error(smollm):
    model, tokenizer = smollm

    class Bad(Modifier):
        def score_bias(self, ctx):
            return torch.zeros(ctx.n_kv)

    with attach(model, modifiers=[Bad()]), pytest.raises(ValueError, match="score_bias"):
        model(input_ids=_ids(tokenizer))
