"""Each policy's selection on constructed keys/scores (exact indices), and clear errors."""
from __future__ import annotations

import math

import pytest
import torch

from attnlab import kv
from attnlab.kv import H2O, Full, PrefillView, Razor, SnapKV, Streaming
from kv_helpers import kept  # same folder (pytest's rootdir import mode)


def view(T: int, H: int = 2, D: int = 4, scores=None, layer: int = 0, n_layers: int = 1) -> PrefillView:
    g = torch.Generator().manual_seed(T)
    keys, values = torch.randn(H, T, D, generator=g), torch.randn(H, T, D, generator=g)
    sc = None if scores is None else torch.tensor(scores, dtype=torch.float32)
    return PrefillView(layer, n_layers, keys, values, sc)


def test_full_keeps_everything():
    assert kept(Full().select(view(6))) == {0: list(range(6)), 1: list(range(6))}


def test_streaming_sinks_and_recent():
    assert kept(Streaming(budget=0.5).select(view(10))) == {0: [0, 1, 2, 3, 9], 1: [0, 1, 2, 3, 9]}
    assert kept(Streaming(budget=0.5, n_sink=2).select(view(10)))[0] == [0, 1, 7, 8, 9]
    (keep,) = Streaming(budget=0.1, n_sink=4).select(view(10))  # one entry: the latest token, no sink
    assert keep.index.tolist() == [[9], [9]] and keep.fixed_size


class SmallWindowSnapKV(SnapKV):
    window = 3


SNAP_SCORES = [[0, 5, 1, 0, 4, 0, 3, 9, 9, 9], [9, 0, 0, 0, 0, 8, 7, 0, 0, 0]]


def test_snapkv_top_votes_plus_window():
    got = kept(SmallWindowSnapKV(budget=0.6, kernel=1).select(view(10, scores=SNAP_SCORES)))
    assert got == {0: [1, 4, 6, 7, 8, 9], 1: [0, 5, 6, 7, 8, 9]}


def test_snapkv_pooling_spreads_votes():
    # kernel 3, zero padded: head 0 votes pool to [5/3, 2, 2, 5/3, 4/3, 7/3, 1]; ties keep the earlier position
    got = kept(SmallWindowSnapKV(budget=0.6, kernel=3).select(view(10, scores=SNAP_SCORES)))
    assert got[0] == [1, 2, 5, 7, 8, 9]


def test_h2o_heavy_hitters_plus_recent():
    scores = [[0, 5, 1, 0, 4, 0, 3, 0, 0, 0], [9, 0, 0, 7, 0, 8, 0, 0, 0, 0]]
    keeps = H2O(budget=0.6).select(view(10, scores=scores))
    assert kept(keeps) == {0: [1, 4, 6, 7, 8, 9], 1: [0, 3, 5, 7, 8, 9]}
    assert keeps[0].fixed_size and H2O.tracks_scores


def test_h2o_evicts_lightest_non_recent():
    from attnlab.kv import Group

    pos = torch.tensor([[0, 3, 5, 7, 8, 9]])
    score = torch.tensor([[0.1, 0.05, 0.9, 0.0, 0.0, 0.0]])  # recent (7, 8, 9) have the least but are protected
    g = Group(torch.tensor([0]), torch.zeros(1, 6, 2), torch.zeros(1, 6, 2), pos, None, score, 6, fixed_size=True)
    assert H2O(budget=0.6).evict(g, 10).tolist() == [1]


def test_razor_protected_full_others_sinks_recent_compensation():
    policy = Razor(budget=0.5, protected=torch.tensor([[0, 1]]), n_sink=2, min_window=2)
    v = view(20, layer=0, n_layers=2)
    keeps = policy.select(v)
    got = kept(keeps)
    assert got == {1: list(range(20)), 0: [0, 1, 17, 18, 19]}
    comp = [k for k in keeps if k.extra_keys is not None][0]
    torch.testing.assert_close(comp.extra_keys[0, 0], v.keys[0, 2:17].mean(0))
    torch.testing.assert_close(comp.extra_values[0, 0], v.values[0, 2:17].mean(0))
    assert comp.extra_log_weight.item() == pytest.approx(math.log(15))
    # layer 1 has no protected head: both heads compressed alike
    assert kept(policy.select(view(20, layer=1, n_layers=2))) == {0: [0, 1, 17, 18, 19], 1: [0, 1, 17, 18, 19]}
    entries = 20 + 3 * (5 + 1)
    assert entries <= 0.5 * 4 * 20


def test_razor_releases_protected_heads_when_budget_is_short():
    policy = Razor(budget=0.5, protected=torch.tensor([[0, 1]]), n_sink=2, min_window=4)
    mask, window = policy.plan(20, 2, 2)
    assert not mask.any() and window == 7  # 40 entries / 4 heads - 2 sinks - 1 compensation
    assert kept(policy.select(view(20, layer=0, n_layers=2)))[1] == [0, 1, *range(13, 20)]


@pytest.mark.parametrize("budget", [0, 0.0, -0.1, 1.5, True, "0.3", float("nan")])
def test_bad_budget(budget):
    with pytest.raises(ValueError, match="budget"):
        Streaming(budget=budget)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="unknown KV policy"):
        kv.make_policy("lru", budget=0.3)
    with pytest.raises(ValueError, match="budget"):
        Full(budget=0.5)
    with pytest.raises(ValueError, match="kernel"):
        SnapKV(budget=0.3, kernel=4)
    with pytest.raises(ValueError, match="recent_share"):
        H2O(budget=0.3, recent_share=2)
    with pytest.raises(ValueError, match="protected"):
        Razor(budget=0.3, protected=torch.tensor([1, 2, 3]))


def test_model_without_supported_cache(minilm):
    model, _ = minilm
    with pytest.raises(kv.UnsupportedModelError, match="KV cache"):
        kv.apply(model, "streaming", budget=0.3)
    with pytest.raises(ValueError):
        kv.check_model(torch.nn.Linear(2, 2))
