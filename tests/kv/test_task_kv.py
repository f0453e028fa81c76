"""Task-KV: heterogeneous heads by the separator, exact kept indices on constructed scores, semantic
vectors on the real SmolLM2 (they add up to the attention output), generation, clear errors."""
from __future__ import annotations

import pytest
import torch

from attnlab import kv
from attnlab.hf import attention_layers
from attnlab.kv import PrefillView, TaskKV
from attnlab.kv.task_kv import centre_distances, heterogeneous_order, semantic_vectors
from attnlab.tasks import make_needle
from kv_helpers import kept  # same folder (pytest's rootdir import mode)


def view(scores, layer: int, n_layers: int = 2) -> PrefillView:
    sc = torch.tensor(scores, dtype=torch.float32)
    H, T = sc.shape
    return PrefillView(layer, n_layers, torch.randn(H, T, 4), torch.randn(H, T, 4), sc)


DIST = torch.tensor([[0.0, 0.0], [0.0, 5.0]])  # mean 1.25, std 2.17: only (1, 1) is beyond mean + 1 std
SCORES = [[0, 0, 9, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
          [0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0]]


def test_separator_picks_far_heads_farthest_first():
    assert heterogeneous_order(DIST, 1.0).tolist() == [[1, 1]]
    d = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0]])
    assert heterogeneous_order(d, 0.5).tolist() == [[1, 1], [0, 0]]
    assert heterogeneous_order(d, 5.0).tolist() == []


def test_centre_distances():
    v = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[0.0, 3.0], [1.0, 0.0]]])  # 3 heads along x, 1 along y
    d = centre_distances(v)  # centre (0.75, 0.25)
    torch.testing.assert_close(d, torch.tensor([[0.25 * 2**0.5] * 2, [(0.75**2 + 0.75**2) ** 0.5, 0.25 * 2**0.5]]))


def test_heterogeneous_full_others_sinks_middle_recent():
    policy = TaskKV(budget=0.5, distance=DIST, n_sink=2, n_recent=2, min_keep=4)
    mask, each = policy.plan(20, 2, 2)
    assert mask.tolist() == [[False, False], [False, True]] and each == 6  # (40 - 20) // 3
    # layer 1: head 1 keeps all; head 0 keeps 2 sinks, its 2 most attended middle tokens, 2 recent
    assert kept(policy.select(view(SCORES, layer=1))) == {1: list(range(20)), 0: [0, 1, 2, 6, 18, 19]}
    # layer 0: both heads non-heterogeneous, middle activations from their summed scores (6: 1 + 5, 2: 9)
    assert kept(policy.select(view(SCORES, layer=0))) == {0: [0, 1, 2, 6, 18, 19], 1: [0, 1, 2, 6, 18, 19]}


def test_short_budget_releases_heterogeneous_heads():
    policy = TaskKV(budget=0.5, distance=DIST, n_sink=2, n_recent=2, min_keep=8)
    mask, each = policy.plan(20, 2, 2)
    assert not mask.any() and each == 10
    assert kept(policy.select(view(SCORES, layer=1)))[1] == [0, 1, 2, 3, 4, 5, 6, 11, 18, 19]


def test_tiny_share_keeps_latest_token():
    policy = TaskKV(budget=0.05, distance=DIST, n_sink=2, n_recent=2, min_keep=0)
    mask, each = policy.plan(20, 2, 2)
    assert not mask.any() and each == 1  # 4 entries over 4 heads; no room for a full head
    assert kept(policy.select(view(SCORES, layer=0))) == {0: [19], 1: [19]}


def test_semantic_vectors_add_up_to_attention_output(smollm):
    model, tok = smollm
    ids = torch.tensor([make_needle(tok, length=128, n_samples=1, seed=2)[0].input_ids])
    outs = {}
    layers = attention_layers(model)
    hooks = [layers[i].o_proj.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0, -8:].mean(0)))
             for i in (0, 17)]
    try:
        vec = semantic_vectors(model, ids, window=8)  # (L, H_kv, hidden)
    finally:
        for h in hooks:
            h.remove()
    cfg = model.config
    assert vec.shape == (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size)
    for i in (0, 17):
        torch.testing.assert_close(vec[i].sum(0), outs[i].float(), rtol=1e-4, atol=1e-4)
    assert not vec.requires_grad


def test_prepare_and_generate_on_smollm(smollm):
    model, tok = smollm
    policy = TaskKV(budget=0.3, task="needle", calibration=(128, 1))
    policy.prepare(model)
    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    assert policy.distance.shape == (L, H) and bool(torch.isfinite(policy.distance).all())
    ids = torch.tensor([make_needle(tok, length=300, n_samples=1, seed=6)[0].input_ids])
    T, new = ids.shape[1], 6
    out, cache = kv.generate(model, ids, policy, max_new_tokens=new, min_new_tokens=new)
    assert out.shape == (1, T + new)
    mask, each = policy.plan(T, L, H)
    prompt_entries = int(mask.sum()) * T + int((~mask).sum()) * each
    assert prompt_entries <= 0.3 * L * H * T  # the budget holds for the prompt; decoded tokens are appended
    per_entry = cache.full_bytes() // (L * H * (T + new - 1))
    assert cache.kept_bytes() == per_entry * (prompt_entries + L * H * (new - 1))
    for layer, full in zip(cache.layers, mask):
        sizes = {int(r): g.n for g in layer.groups for r in g.rows}
        for h in range(H):  # decoded tokens are appended to every head
            assert sizes[h] == (T if full[h] else each) + new - 1
        for g in layer.groups:
            assert (g.pos[:, :4] == torch.arange(4)).all()  # sinks kept
            assert (g.pos[:, : g.n].max(1).values == T + new - 2).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="budget"):
        TaskKV(budget=1.2)
    with pytest.raises(ValueError, match="separator"):
        TaskKV(budget=0.3, separator=float("nan"))
    with pytest.raises(ValueError, match="n_recent"):
        TaskKV(budget=0.3, n_recent=-1)
    with pytest.raises(ValueError, match="unknown task"):
        TaskKV(budget=0.3, task="sudoku")
    with pytest.raises(ValueError, match="distance"):
        TaskKV(budget=0.3, distance=torch.ones(3))
    with pytest.raises(ValueError, match="distance"):
        TaskKV(budget=0.3, distance=DIST).plan(20, 30, 3)
    with pytest.raises(ValueError, match="prepare"):
        TaskKV(budget=0.3).plan(20, 2, 2)
    with pytest.raises(ValueError, match="calibration"):
        TaskKV(budget=0.3, calibration=(0, 1))
    assert isinstance(kv.make_policy("task_kv", budget=0.3), TaskKV)
