"""Batched few-shot scoring (left padding, real-token positions) gives batch 1's numbers, with and without
input-adaptive interventions, on real SmolLM2 prompts of different lengths."""
from __future__ import annotations

import numpy as np
import pytest

from attnlab.eval import classification_prompts, score_prompts
from attnlab.interventions import act, zerotuning


@pytest.fixture(scope="module")
def rte(smollm):
    _, tok = smollm
    ps = classification_prompts("rte", tok, "test", 2, 0, 5)
    assert len({len(p) for p in ps.prompts}) > 1  # padding really happens
    return ps


def _both(model, tok, ps):
    one = score_prompts(model, tok, ps, batch_size=1)
    many = score_prompts(model, tok, ps, batch_size=3)
    return one, many


@pytest.mark.parametrize("how", ["plain", "act", "zerotuning"])
def test_batched_scores_match_batch_one(smollm, rte, how):
    model, tok = smollm
    handle = {"plain": lambda: None,
              "act": lambda: act(model, tok, None, heads=[(3, 1), (5, 2), (9, 4)], beta=0.2),
              "zerotuning": lambda: zerotuning(model, tok, None, heads=[(0, 1), (2, 3)], gamma=3.0)}[how]()
    try:
        (ll1, cf1), (ll3, cf3) = _both(model, tok, rte)
    finally:
        if handle is not None:
            handle.detach()
    assert ll1.shape == ll3.shape == (5, 2) and cf1.shape == cf3.shape == (3, 2)
    np.testing.assert_allclose(ll3, ll1, atol=5e-5, rtol=0)
    np.testing.assert_allclose(cf3, cf1, atol=5e-5, rtol=0)


def test_batch_size_is_checked(smollm, rte):
    model, tok = smollm
    with pytest.raises(ValueError, match="batch_size"):
        score_prompts(model, tok, rte, batch_size=0)
