"""VAR (text form) on SmolLM2: content-focused rows keep p of their sink attention; the rest is moved proportionally."""
from __future__ import annotations

import pytest
import torch

from attnlab.analysis._modules import find_blocks
from attnlab.analysis.massive_activations import massive_activations
from attnlab.hf import attach
from attnlab.interventions import INTERVENTIONS
from attnlab.interventions.var import VARRedistribution, attach_var, discover_sink_dims, sink_tokens, var
from attnlab.probes.base import Observer

LAYER = 10
TEXT = ("Review: great fun\nSentiment: positive\nReview: the film was dull, and I did not like it. The end.\n"
        "Sentiment: negative\nReview: fine, but long\nSentiment:")


class Recorder(Observer):
    def __init__(self, layer):
        self.layer, self.rows = layer, []

    def observe(self, ctx, q_start, probs):
        if ctx.layer == self.layer:
            self.rows.append(probs.clone())

    def probs(self):
        return torch.cat(self.rows, 2)


@pytest.fixture(scope="module")
def setup(smollm):
    model, tokenizer = smollm
    cal = [tokenizer(TEXT).input_ids, tokenizer(TEXT.replace("great fun", "a bore")).input_ids]
    dims = discover_sink_dims(model, cal)
    ids = torch.tensor([cal[0]])
    hidden = {}

    def keep(_module, args, kwargs):
        hidden["h"] = args[0] if args else kwargs["hidden_states"]

    handle = find_blocks(model)[LAYER].register_forward_pre_hook(keep, with_kwargs=True)
    rec = Recorder(LAYER)
    try:
        with torch.no_grad(), attach(model, observers=[rec]):
            model(input_ids=ids)
    finally:
        handle.remove()
    return cal, dims, ids, hidden["h"], rec


def test_sink_rule_matches_massive_activations(smollm, setup):
    model, _ = smollm
    _, dims, ids, h, _ = setup
    assert dims  # SmolLM2 has massive-activation dimensions
    flags = sink_tokens(h, dims)[0]  # (N,)
    # the analysis module's rms rule on the same hidden state, restricted to D_sink
    summary = massive_activations([h] * 4)  # layers 2..L-2 of a 4-layer list: layer 2 holds h
    assert {e["position"] for e in summary["var_sink_tokens"]} <= set(flags.nonzero().flatten().tolist())
    assert flags.any() and not flags.all()


@pytest.mark.parametrize("p", [0.6, 0.2])
def test_var_moves_sink_mass_in_content_rows_only(smollm, setup, p):
    model, _ = smollm
    _, dims, ids, h, plain = setup
    head_list = list(range(model.config.num_attention_heads))
    sinks = sink_tokens(h, dims)[0]
    rec = Recorder(LAYER)
    modifier = VARRedistribution([(LAYER, hd) for hd in head_list[:5]], dims, p=p)
    with torch.no_grad(), attach_var(model, modifier, observers=[rec]):  # observers: the exact path, same bias
        model(input_ids=ids)
    a, b = plain.probs()[0].double(), rec.probs()[0].double()  # (H, N, N)
    moved = 0
    for hd in head_list[:5]:
        m = a[hd][:, sinks].sum(-1)
        content = (m <= 0.5) & (m > 0)
        torch.testing.assert_close(b[hd][content][:, sinks], p * a[hd][content][:, sinks], atol=1e-6, rtol=1e-4)
        scale = ((1 - p * m) / (1 - m))[content, None]
        torch.testing.assert_close(b[hd][content][:, ~sinks], a[hd][content][:, ~sinks] * scale, atol=1e-6, rtol=1e-4)
        assert torch.equal(rec.probs()[0][hd][~content], plain.probs()[0][hd][~content])  # sink-focused rows untouched
        moved += int(content.sum())
    assert moved > 0
    torch.testing.assert_close(b.sum(-1), torch.ones_like(b.sum(-1)), atol=1e-5, rtol=0)
    assert torch.equal(rec.probs()[0][5:], plain.probs()[0][5:])  # unnamed heads bit-identical


def test_var_apply_detach_restores_and_fused_matches_exact(smollm, setup):
    model, tokenizer = smollm
    cal, dims, ids, _, _ = setup
    with torch.no_grad():
        before = model(input_ids=ids).logits
        handle = var(model, tokenizer, cal, n_heads=6)
        assert len(handle.info["heads"]) == 6 and handle.info["sink_dims"] == list(dims)
        assert all(2 <= l <= 28 for l, _ in handle.info["heads"])
        fused = model(input_ids=ids).logits
        heads = [tuple(x) for x in handle.info["heads"]]
        handle.detach()
        after = model(input_ids=ids).logits
        with attach_var(model, VARRedistribution(heads, dims), observers=[Recorder(0)]):
            exact = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert (fused - before).abs().max() > 1e-4
    torch.testing.assert_close(fused, exact, atol=2e-4, rtol=1e-4)
    assert model.config._attn_implementation != "attnlab"


def test_registry_entry():
    assert INTERVENTIONS["var"].apply is var and "Visual Attention Sink" in INTERVENTIONS["var"].paper


@pytest.mark.parametrize("kwargs, match", [
    ({"heads": [(2, 9)], "sink_dims": [1]}, "head out of range"),
    ({"heads": [(2, 1)], "sink_dims": [1], "p": 0.0}, "p"),
    ({"heads": [(2, 1)], "sink_dims": [1], "rho": 2.0}, "rho"),
    ({"heads": [(2, 1)], "sink_dims": "12"}, "sink_dims"),
    ({"heads": "all", "sink_dims": [1]}, "heads"),
    ({"heads": "auto"}, "calibration"),
])
def test_bad_arguments(smollm, kwargs, match):
    model, tokenizer = smollm
    with pytest.raises(ValueError, match=match):
        var(model, tokenizer, None, **kwargs)
    assert model.config._attn_implementation != "attnlab"
