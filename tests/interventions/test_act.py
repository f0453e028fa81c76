"""ACT on SmolLM2: hidden sinks detected per input lose exactly (1 - beta) of their attention, proportionally."""
from __future__ import annotations

import pytest
import torch

from attnlab.analysis import hidden_sinks
from attnlab.hf import attach
from attnlab.interventions import INTERVENTIONS
from attnlab.interventions.act import ACTCalibration, act, detect_sinks
from attnlab.interventions._redistribute import visible_keys
from attnlab.probes.base import Observer

LAYER, HEAD = 11, 2  # a head with hidden sinks on these prompts (checked by the tests themselves)
TEXT = ("Review: great fun\nSentiment: positive\nReview: the film was dull, and I did not like it. The end.\n"
        "Sentiment: negative\nReview: fine, but long\nSentiment:")


class Recorder(Observer):
    def __init__(self, layer):
        self.layer, self.rows = layer, []

    def observe(self, ctx, q_start, probs):
        if ctx.layer == self.layer:
            self.rows.append(probs.clone())
            self.ctx = ctx

    def probs(self):
        return torch.cat(self.rows, 2)


def _record(model, ids, layer, modifiers=()):
    rec = Recorder(layer)
    with torch.no_grad(), attach(model, observers=[rec], modifiers=list(modifiers)):
        logits = model(input_ids=ids).logits
    return rec, logits


@pytest.fixture(scope="module")
def plain(smollm):
    model, tokenizer = smollm
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    rec, logits = _record(model, ids, LAYER)
    return ids, rec, logits


def test_detection_agrees_with_analysis_hidden_sinks(plain):
    ids, rec, _ = plain
    p = rec.probs()  # (1, H, N, N)
    ours = detect_sinks(p, visible_keys(rec.ctx, p.device))  # (1, H, N)
    summary = hidden_sinks([p], causal=True)
    per_head = torch.tensor(summary["per_head"]["n_hidden_sinks"][0])
    assert torch.equal(ours[0].sum(-1).double(), per_head)
    assert {e["position"] for e in summary["tokens"]} == set(ours[0].any(0).nonzero().flatten().tolist())
    assert ours[0, HEAD].any()  # the test head has hidden sinks on this prompt


@pytest.mark.parametrize("beta", [0.4, 0.1])
def test_act_moves_exactly_the_surplus_off_the_sinks(smollm, plain, beta):
    model, _ = smollm
    ids, rec, base_logits = plain
    calibrated, logits = _record(model, ids, LAYER, [ACTCalibration([(LAYER, HEAD)], beta=beta)])
    p, q = rec.probs()[0].double(), calibrated.probs()[0].double()  # (H, N, N)
    sinks = detect_sinks(rec.probs(), visible_keys(rec.ctx, p.device))[0, HEAD]  # (N,)
    m = p[HEAD][:, sinks].sum(-1)  # (N,) sink mass per row
    rows = (m > 0) & (m < 1 - 1e-6)
    assert rows.any()
    torch.testing.assert_close(q[HEAD][rows][:, sinks], beta * p[HEAD][rows][:, sinks], atol=1e-6, rtol=1e-4)
    scale = ((1 - beta * m) / (1 - m))[rows, None]
    torch.testing.assert_close(q[HEAD][rows][:, ~sinks], p[HEAD][rows][:, ~sinks] * scale, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(q.sum(-1), torch.ones_like(q.sum(-1)), atol=1e-5, rtol=0)
    assert q[HEAD][:, sinks].sum() < p[HEAD][:, sinks].sum()
    others = [h for h in range(q.shape[0]) if h != HEAD]
    assert torch.equal(calibrated.probs()[0][others], rec.probs()[0][others])
    assert not torch.equal(logits, base_logits)


def test_fused_equals_exact_and_detach_restores(smollm, plain):
    model, _ = smollm
    ids, _, _ = plain
    heads = [(LAYER, HEAD), (12, 1), (10, 0)]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        handle = act(model, None, None, heads=heads)
        assert not handle.exact  # fused SDPA path
        fused = model(input_ids=ids).logits
        handle.detach()
        after = model(input_ids=ids).logits
    _, exact = _record(model, ids, 0, [ACTCalibration(heads)])
    assert torch.equal(before, after)
    assert (fused - before).abs().max() > 1e-3
    torch.testing.assert_close(fused, exact, atol=2e-4, rtol=1e-4)


def test_auto_keeps_heads_whose_calibration_nll_falls(smollm):
    model, tokenizer = smollm
    cal = [tokenizer(TEXT).input_ids, tokenizer(TEXT.replace("great fun", "a bore")).input_ids]
    with act(model, tokenizer, cal, n_heads=2, max_candidates=3) as handle:
        info = handle.info
    assert len(info["candidates"]) == 3 and set(info["gain"]) == set(info["candidates"])
    gains = {tuple(map(int, k.split(","))): v for k, v in info["gain"].items()}
    kept = sorted((g, h) for h, g in gains.items() if g > 0)[::-1][:2]
    assert sorted(map(tuple, info["heads"])) == sorted(h for _, h in kept)
    assert all(2 <= l <= 28 for l, _ in gains)


def test_registry_entry():
    assert INTERVENTIONS["act"].apply is act and "Hidden Attention Sinks" in INTERVENTIONS["act"].paper


@pytest.mark.parametrize("kwargs, match", [
    ({"heads": [(0, 9)]}, "head out of range"),
    ({"heads": [(0, 1)], "beta": 0.0}, "beta"),
    ({"heads": [(0, 1)], "beta": 1.5}, "beta"),
    ({"heads": "all"}, "heads"),
    ({"heads": "auto"}, "calibration"),
    ({"heads": [(0, 1)], "n_heads": 0}, "n_heads"),
])
def test_bad_arguments(smollm, kwargs, match):
    model, tokenizer = smollm
    with pytest.raises(ValueError, match=match):
        act(model, tokenizer, None, **kwargs)
    assert model.config._attn_implementation != "attnlab"
