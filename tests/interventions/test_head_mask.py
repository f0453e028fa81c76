"""head_mask / head_scale on SmolLM2: named heads change, all others bit-identical, detach restores."""
from __future__ import annotations

import pytest
import torch

from attnlab.hf.attach import attention_layers
from attnlab.interventions import HeadScale, head_mask, head_scale


def _ids(tokenizer, n=24):
    text = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat by the door."
    return tokenizer(text, return_tensors="pt").input_ids[:, :n]


def _head_outputs(model, ids):
    """{layer: (B, T, H, D) per-head attention output} captured at each o_proj input."""
    cfg = model.config
    outs, handles = {}, []
    for layer, module in attention_layers(model).items():
        def hook(_m, args, layer=layer):
            x = args[0]
            outs[layer] = x.view(*x.shape[:2], cfg.num_attention_heads, -1).clone()
        handles.append(module.o_proj.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return outs, logits


def test_head_mask_changes_named_heads_only(smollm):
    model, tokenizer = smollm
    ids = _ids(tokenizer)
    base, base_logits = _head_outputs(model, ids)
    named = [(3, 1), (3, 7), (10, 0)]
    with head_mask(model, heads=named):
        masked, logits = _head_outputs(model, ids)
    # layers before the first named one see identical inputs, so every head there is bit-identical
    for layer in range(3):
        assert torch.equal(masked[layer], base[layer])
    for layer, head in named:
        assert torch.count_nonzero(masked[layer][:, :, head]) == 0
    # in layer 3 the unnamed heads are bit-identical (same inputs, untouched outputs)
    for head in range(model.config.num_attention_heads):
        if head not in (1, 7):
            assert torch.equal(masked[3][:, :, head], base[3][:, :, head])
    assert not torch.equal(logits, base_logits)


def test_head_scale_multiplies_exactly(smollm):
    model, tokenizer = smollm
    ids = _ids(tokenizer)
    base, _ = _head_outputs(model, ids)
    with head_scale(model, heads=[(0, 2), (0, 5)], scale=[2.0, 0.5]):
        scaled, _ = _head_outputs(model, ids)
    assert torch.equal(scaled[0][:, :, 2], base[0][:, :, 2] * 2.0)
    assert torch.equal(scaled[0][:, :, 5], base[0][:, :, 5] * 0.5)
    others = [h for h in range(model.config.num_attention_heads) if h not in (2, 5)]
    assert torch.equal(scaled[0][:, :, others], base[0][:, :, others])


def test_detach_restores_bit_identical_logits(smollm):
    model, tokenizer = smollm
    ids = _ids(tokenizer)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        handle = head_scale(model, heads=[(5, 4)], scale=3.0)
        during = model(input_ids=ids).logits
        handle.detach()
        after = model(input_ids=ids).logits
    assert not torch.equal(before, during)
    assert torch.equal(before, after)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"heads": [(30, 0)]}, "layer out of range"),
        ({"heads": [(0, 9)]}, "head out of range"),
        ({"heads": [(-1, 0)]}, "layer out of range"),
        ({"heads": []}, "names no head"),
        ({"heads": "0,1"}, "heads"),
        ({"heads": [(0, 1.5)]}, "int pairs"),
        ({"heads": [(0, 1)], "scale": -1.0}, "scale"),
        ({"heads": [(0, 1)], "scale": float("nan")}, "scale"),
        ({"heads": [(0, 1), (0, 2)], "scale": [1.0]}, "one per head"),
    ],
)
def test_bad_arguments(smollm, kwargs, match):
    model, _ = smollm
    with pytest.raises(ValueError, match=match):
        head_scale(model, **kwargs)
    assert model.config._attn_implementation != "attnlab"  # nothing left attached


def test_head_scale_modifier_rejects_negative():
    with pytest.raises(ValueError, match="scale"):
        HeadScale({(0, 0): -0.5})
