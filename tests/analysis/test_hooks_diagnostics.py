"""Hook-based diagnostics (massive activations, layer redundancy, head ablation) and run_diagnostics."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attnlab.analysis import (LayerRedundancy, MassiveActivations, ablation_losses, head_importance,
                              layer_redundancy, massive_activations, run_diagnostics)
from attnlab.analysis._modules import block_kind, find_blocks


def test_massive_activations_hooks_equal_hidden_states(smollm, kjv_text):
    model, tok = smollm
    enc = tok([kjv_text, "And God saw the light."], return_tensors="pt", padding=True)
    with MassiveActivations(model, attention_mask=enc.attention_mask) as ma, torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    got = ma.result()
    n = len(find_blocks(model))
    # output_hidden_states[1:n] are the outputs of blocks 0..n-2 (the last entry is after the final norm)
    want = massive_activations(out.hidden_states[1:n], attention_mask=enc.attention_mask)
    for key in ("median_abs", "max_abs", "n_massive"):
        assert np.allclose(got["per_layer"][key][: n - 1], want["per_layer"][key], rtol=1e-6)
    assert got["layers"][: n - 1] == want["layers"]
    first = [d["dim"] for layer in got["layers"] if layer for d in layer["dims"]]
    print(f"SmolLM2 massive dims {got['sink_dims']}, most frequent {max(set(first), key=first.count) if first else None}; "
          f"max |h| per layer {np.round(got['per_layer']['max_abs'], 0).tolist()}")
    # our hooks are gone after the block (transformers may keep hooks of its own)
    left = [h for b in find_blocks(model) for h in b._forward_hooks.values()]
    assert not [h for h in left if h.__module__ == "attnlab.analysis.massive_activations"]


def _reference_xy(model, enc, kind):
    """X = block input (output_hidden_states), Y = X + attention output (hooked independently)."""
    attn_out = {}
    blocks = find_blocks(model)
    handles = []
    for i, b in enumerate(blocks):
        mod = b.self_attn if kind == "prenorm" else b.attention.output.dense
        handles.append(mod.register_forward_hook(
            lambda m, a, o, i=i: attn_out.__setitem__(i, (o[0] if isinstance(o, tuple) else o).detach())))
    try:
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    xs = [hs[i] for i in range(len(blocks))]
    return xs, [x + attn_out[i] for i, x in enumerate(xs)]


@pytest.mark.parametrize("which", ["smollm", "minilm"])
def test_layer_redundancy_equals_reference(which, request, kjv_text):
    model, tok = request.getfixturevalue(which)
    enc = tok([kjv_text, "And God saw the light."], return_tensors="pt", padding=True)
    kind = block_kind(find_blocks(model)[0])
    with LayerRedundancy(model, attention_mask=enc.attention_mask) as lr, torch.no_grad():
        model(**enc)
    xs, ys = _reference_xy(model, enc, kind)
    want = layer_redundancy(xs, ys, attention_mask=enc.attention_mask)
    got = lr.result()
    assert np.allclose(got["per_layer"]["attn_cosine"], want["per_layer"]["attn_cosine"], atol=1e-6)
    assert got["drop_order"][0] == want["drop_order"][0]
    print(f"{which} attention cos(X, X+Attn) per layer: {np.round(got['per_layer']['attn_cosine'], 3).tolist()}")


def test_unsupported_blocks_raise():
    with pytest.raises(ValueError, match="unsupported block layout"):
        block_kind(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="number of layers"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_batched_ablation_equals_one_head_at_a_time(smollm, kjv_text):
    model, tok = smollm
    ids = tok(kjv_text, return_tensors="pt").input_ids[:, :24]
    heads = [(0, 0), (3, 4), (17, 2), (29, 8)]
    heads += [(17, 5), (17, 7)]  # several heads of one layer share a forward
    batched = ablation_losses(model, ids, heads, batch_size=4, progress=False)
    replicated = ablation_losses(model, ids, heads, batch_size=4, share_prefix=False, progress=False)
    single = [ablation_losses(model, ids, [h], batch_size=1, share_prefix=False, progress=False)[0] for h in heads]
    assert np.allclose(batched, single, atol=1e-5, rtol=0), np.array(batched) - np.array(single)
    assert np.allclose(replicated, single, atol=1e-5, rtol=0), np.array(replicated) - np.array(single)
    # zeroing a head really changes the loss, differently for different heads
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    base = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    assert all(abs(b - base) > 1e-4 for b in batched) and len({round(b, 6) for b in batched}) == len(heads)


def test_ablation_errors(smollm, minilm):
    model, tok = smollm
    ids = tok("In the beginning", return_tensors="pt").input_ids
    with pytest.raises(ValueError, match="out of range"):
        ablation_losses(model, ids, [(30, 0)], progress=False)
    with pytest.raises(ValueError, match="input_ids"):
        ablation_losses(model, ids.expand(2, -1), [(0, 0)], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        ablation_losses(model, ids, [(0, 0)], batch_size=0, progress=False)
    with pytest.raises(ValueError, match="output head"):
        head_importance(minilm[0], ids, progress=False)


@pytest.mark.slow
def test_ablation_all_heads_256_tokens(smollm):
    import pathlib
    import time

    import attnlab

    model, tok = smollm
    text = (pathlib.Path(attnlab.__file__).parent / "data" / "kjv_genesis.txt").read_text()
    ids = tok(text, return_tensors="pt").input_ids[:, :256]
    t = time.perf_counter()
    r = head_importance(model, ids, progress=True)
    elapsed = time.perf_counter() - t
    delta = np.array(r["per_head"]["loss_delta"])
    print(f"ablation of {delta.size} heads on 256 tokens: {elapsed:.0f} s; base loss {r['base_loss']:.3f}; "
          f"largest delta {delta.max():.3f} at {np.unravel_index(delta.argmax(), delta.shape)}")
    assert delta.shape == (30, 9)


def _check_schema(r, n_layers, n_heads):
    json.dumps(r, allow_nan=False)  # plain JSON, no NaN
    for name, grid in r["per_head"].items():
        assert len(grid) == n_layers and all(len(row) == n_heads for row in grid), name
    for name, row in r["per_layer"].items():
        assert len(row) == n_layers, name
    assert r["thumbnails"]["maps"] and len(r["thumbnails"]["maps"]) == len(r["thumbnails"]["heads"])


def test_run_diagnostics_smollm(smollm, kjv_text):
    model, tok = smollm
    ids = tok(kjv_text, return_tensors="pt").input_ids
    r = run_diagnostics(model, tok, ids, chunk=32, ablation=False, progress=False, induction_period=16)
    _check_schema(r, 30, 9)
    assert r["model"]["causal"] and r["head_importance"] is None
    assert "".join(r["input"]["tokens"]) == tok.decode(ids[0])
    for e in r["hidden_sinks"]["tokens"]:
        assert e["text"] == tok.decode([int(ids[0, e["index"]])])
    # the model is restored: eager-free plain forward equals a fresh one
    assert model.config._attn_implementation == "sdpa"
    print("hidden sinks:", [(e["position"], e["text"], e["n_heads"]) for e in r["hidden_sinks"]["tokens"][:5]])


def test_run_diagnostics_minilm_padded(minilm, kjv_text):
    model, tok = minilm
    enc = tok([kjv_text, "And God saw the light."], return_tensors="pt", padding=True)
    r = run_diagnostics(model, tok, enc.input_ids, attention_mask=enc.attention_mask, chunk=16,
                        progress=False, induction_period=16)
    _check_schema(r, 6, 12)
    assert not r["model"]["causal"]
    assert r["sinks"]["n_samples"] == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "input_ids"),
    (dict(input_ids=torch.zeros(4, dtype=torch.long)), "input_ids"),
    (dict(input_ids=torch.zeros(1, 4)), "input_ids"),
    (dict(input_ids=torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5)), "attention_mask"),
    (dict(input_ids=torch.zeros(1, 4, dtype=torch.long), chunk=0), "chunk"),
])
def test_run_diagnostics_bad_args(smollm, kwargs, match):
    model, tok = smollm
    with pytest.raises(ValueError, match=match):
        run_diagnostics(model, tok, progress=False, **kwargs)
