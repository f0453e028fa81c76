"""Razor's ``heads="probe"`` option (beyond the paper): protected KV heads ranked by their marginal value at
razor's operating point (:func:`attnlab.kv.razor.probe_head_values`) instead of echo / induction scores."""
from __future__ import annotations

import pytest
import torch

from attnlab.kv import Razor
from attnlab.kv import razor as razor_mod
from attnlab.kv.evaluate import record_prefill
from attnlab.kv.session import apply


def test_bad_heads_argument():
    with pytest.raises(ValueError, match="heads"):
        Razor(budget=0.3, heads="retrieval")


def test_probe_heads_take_the_stored_ranking_with_the_score_count(smollm, monkeypatch):
    model, _ = smollm
    scores = Razor(budget=0.3, heads="scores")
    scores.prepare(model)
    cfg = model.config
    ranking = [[layer, head] for layer in reversed(range(cfg.num_hidden_layers))
               for head in range(cfg.num_key_value_heads)]  # a stored ranking: latest layers first
    monkeypatch.setitem(razor_mod.PROBE_ORDERS, razor_mod._model_key(model), ranking)
    monkeypatch.setattr(razor_mod, "_PROBES", type(razor_mod._PROBES)())
    probe = Razor(budget=0.3)
    assert probe.heads == "probe"  # the default since session 6
    probe.prepare(model)
    n = scores.protected.shape[0]
    assert probe.protected.tolist() == ranking[:n]
    assert probe.plan(4096, cfg.num_hidden_layers, cfg.num_key_value_heads)[1] == \
        scores.plan(4096, cfg.num_hidden_layers, cfg.num_key_value_heads)[1]  # same bytes, same window


@pytest.mark.slow
def test_probe_values_are_the_nll_changes_of_single_head_flips(smollm):
    """Short real prompts (512 tokens, one multikey sample): a protected head's value is the rise of the full
    answer's NLL when it alone is compressed; a compressed head's the fall when it alone is protected."""
    model, tok = smollm
    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    seen = {}
    values = razor_mod.probe_head_values(model, tok, length=512, samples=(1, 0),
                                         on_sample=lambda task, s, target, ref, v: seen.update(s=s, target=target, ref=ref))
    assert values.shape == (L, H) and torch.isfinite(values).all()
    base = Razor(budget=0.3, heads="scores")
    base.prepare(model)
    ids = torch.tensor([seen["s"].input_ids])
    T = ids.shape[1]
    mask, window = base.plan(T, L, H)
    with apply(model, None) as session, torch.no_grad():
        rec, _, _ = record_prefill(model, ids, frozenset({"window"}), session)
        ref = razor_mod._answer_nll(model, rec.compressed(base, reserve=16), T, seen["target"])
        assert ref == pytest.approx(seen["ref"], rel=1e-5)
        for layer, head in [tuple(base.protected[0].tolist()), (int((~mask).nonzero()[0, 0]), int((~mask).nonzero()[0, 1]))]:
            m = mask.clone()
            m[layer, head] = ~m[layer, head]
            pol = razor_mod._FixedPlan(budget=0.3, heads="scores", protected=base.protected, mask=m, fixed_window=window)
            d = razor_mod._answer_nll(model, rec.compressed(pol, reserve=16), T, seen["target"]) - ref
            assert values[layer, head].item() == pytest.approx(d if mask[layer, head] else -d, rel=1e-4, abs=1e-4)
