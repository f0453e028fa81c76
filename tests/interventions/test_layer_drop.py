"""Attention-layer drop on SmolLM2: dropped layers never run, others are untouched, detach restores."""
from __future__ import annotations

import pytest
import torch

from attnlab.analysis.layer_redundancy import LayerRedundancy
from attnlab.hf import attach
from attnlab.interventions.layer_drop import choose_layers, drop_attention_layers, redundancy_order
from attnlab.probes.base import Observer


@pytest.fixture(scope="module")
def kjv(smollm):
    """Token ids of the bundled KJV Genesis text: (calibration prompts, held-out ids (1, 64))."""
    from importlib.resources import files

    _, tokenizer = smollm
    ids = tokenizer(files("attnlab.data").joinpath("kjv_genesis.txt").read_text()[:12000])["input_ids"]
    return [ids[0:40], ids[40:80]], torch.tensor([ids[2000:2064]])


def _nll(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]))


def _trace(model, ids):
    """(logits, {layer: residual entering attention}, {layer: residual after it}, {layer: q_proj calls})."""
    x_in, x_out, calls, handles = {}, {}, {}, []
    for i, block in enumerate(model.model.layers):
        handles.append(block.input_layernorm.register_forward_pre_hook(lambda m, a, i=i: x_in.__setitem__(i, a[0].clone())))
        handles.append(block.post_attention_layernorm.register_forward_pre_hook(lambda m, a, i=i: x_out.__setitem__(i, a[0].clone())))
        handles.append(block.self_attn.q_proj.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls.get(i, 0) + 1)))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, x_in, x_out, calls


def test_dropped_layers_skip_attention_and_others_are_untouched(smollm, kjv):
    model, _ = smollm
    _, ids = kjv
    base_logits, base_in, base_out, _ = _trace(model, ids)
    dropped = [5, 12]
    with drop_attention_layers(model, dropped) as handle:
        assert handle.active and handle.layers == (5, 12)
        logits, x_in, x_out, calls = _trace(model, ids)
    for layer in dropped:
        assert layer not in calls  # the attention module never ran: no projection at all
        assert torch.equal(x_out[layer], x_in[layer])  # X + 0 = X exactly
    assert all(calls.get(layer) == 1 for layer in range(30) if layer not in dropped)
    for layer in range(5):  # before the first dropped layer: bit-identical
        assert torch.equal(x_out[layer], base_out[layer])
    assert not torch.equal(x_out[5], base_out[5])
    assert not torch.allclose(logits, base_logits)
    assert torch.equal(model(input_ids=ids).logits.detach(), base_logits)  # detach restored bit-identically


def test_probs_of_kept_layers_sum_to_one_and_dropped_layers_are_not_seen(smollm, kjv):
    model, _ = smollm
    _, ids = kjv

    class Sums(Observer):
        def __init__(self):
            self.layers, self.worst = set(), 0.0

        def observe(self, ctx, q_start, probs):
            self.layers.add(ctx.layer)
            self.worst = max(self.worst, float((probs.sum(-1) - 1).abs().max()))

    sums = Sums()
    with drop_attention_layers(model, [3, 20]), attach(model, [sums]), torch.no_grad():
        model(input_ids=ids[:, :24])
    assert sums.layers == set(range(30)) - {3, 20}
    assert sums.worst < 1e-5


def test_generation_with_cache_matches_without(smollm, kjv):
    """A dropped layer keeps its KV-cache slot in step, so cached decoding equals uncached decoding."""
    model, _ = smollm
    _, ids = kjv
    prompt = ids[:, :12]
    with drop_attention_layers(model, [0, 9, 28]), torch.no_grad():  # layer 0 holds the cache length
        cached = model.generate(prompt, max_new_tokens=4, do_sample=False)
        plain = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_similarity_order_is_layer_redundancy_and_beats_the_reverse(smollm, kjv):
    """The paper's claim on SmolLM2: dropping the most redundant layers costs far less than the least."""
    model, _ = smollm
    calibration, ids = kjv
    order = redundancy_order(model, calibration)
    with LayerRedundancy(model) as probe, torch.no_grad():
        for prompt in calibration:
            model(input_ids=torch.tensor([prompt]))
    assert order == probe.result()["drop_order"]
    assert choose_layers(model, calibration, 3) == order[:3]
    base = _nll(model, ids)
    with drop_attention_layers(model, order[:3]):
        redundant = _nll(model, ids)
    with drop_attention_layers(model, order[-3:]):
        essential = _nll(model, ids)
    assert base < redundant < base + 1.0 < essential  # measured: about +0.2 nats vs +5 nats


def test_random_choice_is_deterministic_per_seed(smollm):
    model, _ = smollm
    a = choose_layers(model, None, 5, order="random", seed=1)
    assert a == choose_layers(model, None, 5, order="random", seed=1)
    assert a != choose_layers(model, None, 5, order="random", seed=2)
    assert len(set(a)) == 5 and all(0 <= l < 30 for l in a)


def test_bad_arguments(smollm, minilm):
    model, _ = smollm
    with pytest.raises(ValueError, match="out of range"):
        drop_attention_layers(model, [30])
    with pytest.raises(ValueError, match="distinct"):
        drop_attention_layers(model, [2, 2])
    with pytest.raises(ValueError, match="layers must be"):
        drop_attention_layers(model, 3)
    with pytest.raises(ValueError, match="k must be"):
        choose_layers(model, [[1, 2]], 31)
    with pytest.raises(ValueError, match="order must be"):
        choose_layers(model, [[1, 2]], 2, order="best")
    with pytest.raises(ValueError, match="calibration"):
        redundancy_order(model, [])
    with pytest.raises(ValueError, match="pre-norm"):
        drop_attention_layers(minilm[0], [0])
    with drop_attention_layers(model, [4]):
        with pytest.raises(ValueError, match="already dropped"):
            drop_attention_layers(model, [1, 4])
        assert "forward" not in model.model.layers[1].self_attn.__dict__  # the failed call undid its own changes
