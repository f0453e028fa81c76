"""ZeroTuning on SmolLM2: the initial token's attention scales by exactly gamma after renormalisation."""
from __future__ import annotations

import pytest
import torch

from attnlab.hf import attach
from attnlab.interventions import INTERVENTIONS
from attnlab.interventions._calibrate import last_token_entropy, left_padded
from attnlab.interventions.zerotuning import InitialTokenScale, profile_heads, zerotuning
from attnlab.probes.base import Observer


class Recorder(Observer):
    def __init__(self, layer):
        self.layer, self.rows = layer, []

    def observe(self, ctx, q_start, probs):
        if ctx.layer == self.layer:
            self.rows.append(probs.clone())

    def probs(self):
        return torch.cat(self.rows, 2)


def _prompts(tokenizer):
    texts = ["Review: great fun\nSentiment: positive\nReview: dull\nSentiment:",
             "Review: a bore\nSentiment: negative\nReview: lovely acting throughout\nSentiment:"]
    return [tokenizer(t).input_ids for t in texts]


@pytest.mark.parametrize("gamma", [0.4, 2.5])
def test_gamma_scales_initial_token_attention_exactly(smollm, gamma):
    model, tokenizer = smollm
    ids = torch.tensor([_prompts(tokenizer)[0]])
    plain, scaled = Recorder(2), Recorder(2)
    with torch.no_grad():
        with attach(model, observers=[plain]):
            model(input_ids=ids)
        # only layer 2 is touched, so its input (and every other head's probabilities) are unchanged
        with attach(model, observers=[scaled], modifiers=[InitialTokenScale({(2, 4): gamma})]):
            model(input_ids=ids)
    p, q = plain.probs()[0], scaled.probs()[0]  # (H, N, N)
    a0 = p[4, :, 0].double()
    d = (gamma - 1) * a0 + 1
    torch.testing.assert_close(q[4, :, 0].double(), gamma * a0 / d, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(q[4, :, 1:].double(), p[4, :, 1:].double() / d[:, None], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(q.sum(-1), torch.ones_like(q.sum(-1)), atol=1e-5, rtol=0)
    others = [h for h in range(q.shape[0]) if h != 4]
    assert torch.equal(q[others], p[others])


def test_fused_path_matches_exact_path_and_detach_restores(smollm):
    model, tokenizer = smollm
    ids = torch.tensor([_prompts(tokenizer)[1]])
    mod = {(1, 2): 2.0, (1, 5): 2.0, (6, 0): 0.5}
    with torch.no_grad():
        before = model(input_ids=ids).logits
        handle = zerotuning(model, tokenizer, None, heads=list(mod)[:2], gamma=2.0)
        fused = model(input_ids=ids).logits
        handle.detach()
        after = model(input_ids=ids).logits
        with attach(model, observers=[Recorder(0)], modifiers=[InitialTokenScale(dict(list(mod.items())[:2]))]):
            exact = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert (fused - before).abs().max() > 1e-3
    torch.testing.assert_close(fused, exact, atol=2e-4, rtol=1e-4)


def test_padding_puts_the_bias_on_the_first_real_token(smollm):
    model, tokenizer = smollm
    prompts = _prompts(tokenizer)
    ids, mask = left_padded(prompts, tokenizer.pad_token_id or 0)
    mod = InitialTokenScale({(0, 1): 3.0, (3, 3): 3.0})
    with torch.no_grad(), attach(model, modifiers=[mod]):
        batch = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        alone = [model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts]
    for row, ref in zip(batch, alone):
        torch.testing.assert_close(row, ref, atol=3e-4, rtol=1e-4)


def test_auto_mode_profiles_heads_and_picks_the_lowest_entropy_gamma(smollm):
    model, tokenizer = smollm
    cal = _prompts(tokenizer)
    with zerotuning(model, tokenizer, cal, profile_layers=1, n_heads=3, gammas=(1.0, 2.0, 4.0)) as handle:
        info = handle.info
    profile = profile_heads(model, cal, layers=[0], pad_id=tokenizer.pad_token_id or 0)
    ranked = sorted((d, pair) for pair, d in profile.items() if d < 0)[:3]
    assert sorted(map(tuple, info["heads"])) == sorted(p for _, p in ranked)
    scores = info["gamma_scores"]
    assert info["gamma"] == min(scores, key=scores.get)
    ids, mask = left_padded(cal, tokenizer.pad_token_id or 0)
    assert scores[1.0] == pytest.approx(float(last_token_entropy(model, ids, mask).mean()), abs=1e-5)


def test_registry_entry(smollm):
    entry = INTERVENTIONS["zerotuning"]
    assert entry.apply is zerotuning and "ZeroTuning" in entry.paper


@pytest.mark.parametrize("kwargs, match", [
    ({"gamma": 0.0, "heads": [(0, 0)]}, "gamma"),
    ({"gamma": -1.0, "heads": [(0, 0)]}, "gamma"),
    ({"gamma": 2.0, "heads": "some"}, "heads"),
    ({"gamma": 2.0, "heads": [(31, 0)]}, "layer out of range"),
    ({"gamma": 2.0, "n_heads": 0}, "n_heads"),
    ({"heads": "auto"}, "calibration"),
])
def test_bad_arguments(smollm, kwargs, match):
    model, tokenizer = smollm
    with pytest.raises(ValueError, match=match):
        zerotuning(model, tokenizer, None, **kwargs)
    assert model.config._attn_implementation != "attnlab"


def test_batched_profile_equals_one_head_at_a_time(smollm):
    """Every probed head is a copy of the prompts in one shared pass; each copy must equal its own run."""
    from attnlab.interventions.zerotuning import mean_entropies

    model, tokenizer = smollm
    cal = _prompts(tokenizer)
    pad = tokenizer.pad_token_id or 0
    profile = profile_heads(model, cal, layers=[1], pad_id=pad, probe_gamma=2.0)
    ids, mask = left_padded(cal, pad)
    base = float(last_token_entropy(model, ids, mask).mean())
    for head in (0, 4, 8):
        with attach(model, modifiers=[InitialTokenScale({(1, head): 2.0})]):
            alone = float(last_token_entropy(model, ids, mask).mean())
        assert profile[(1, head)] == pytest.approx(alone - base, abs=2e-5)
    # settings split over several passes give the same numbers as one pass
    settings = [{(1, h): 2.0} for h in range(9)]
    one_pass = mean_entropies(model, ids, mask, settings)
    small_passes = mean_entropies(model, ids, mask, settings, batch_tokens=1)
    assert one_pass == pytest.approx(small_passes, abs=2e-5)
    assert len({round(e, 4) for e in one_pass}) > 1  # the heads really differ
