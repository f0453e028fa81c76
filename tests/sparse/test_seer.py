"""SeerAttention: pooled ground truth, gates, training, block selections, block-sparse prefill on SmolLM2."""
from __future__ import annotations

from importlib import resources

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnlab.hf.attach import attach
from attnlab.sparse.seer import (
    AttnGate, PooledAttention, calibration_data, distance_buckets, make_gates, mean_kl, pool_qk, rope_inv_freq,
    target_distribution, train_gates, unrotate,
)
from attnlab.sparse.seer_prefill import (
    BlockSelect, select_sink_window, select_threshold, select_topk, select_window, topk_density,
)

BLOCK = 16


def _ids(tok, n: int) -> torch.Tensor:
    text = resources.files("attnlab.data").joinpath("kjv_genesis.txt").read_text()
    ids = tok(text, return_tensors="pt").input_ids
    return ids[:, :n]


@pytest.fixture(scope="module")
def ids(smollm):
    return _ids(smollm[1], 128)


def test_pooled_ground_truth_equals_pooled_eager_map(smollm, ids):
    model, _ = smollm
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = model(input_ids=ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    observers = {reduce: PooledAttention(BLOCK, reduce) for reduce in ("max", "mean")}
    with torch.no_grad(), attach(model, list(observers.values()), chunk=24):  # chunks straddle block borders
        model(input_ids=ids)
    for reduce, obs in observers.items():
        for layer in (0, 7, 29):
            a = eager[layer].float()
            b, h, n, _ = a.shape
            tiles = a.view(b, h, n // BLOCK, BLOCK, n // BLOCK, BLOCK)
            ref = tiles.amax((3, 5)) if reduce == "max" else tiles.sum(5).mean(3)
            assert (obs.maps[layer] - ref).abs().max().item() < 1e-5, (reduce, layer)
        if reduce == "mean":
            assert torch.allclose(obs.maps[3].sum(-1), torch.ones(()), atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(qb=st.integers(1, 9), k=st.integers(1, 12), h=st.integers(1, 3), seed=st.integers(0, 1000))
def test_selections_stay_causal_and_keep_the_diagonal(qb, k, h, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, h, qb, qb, generator=g)
    probs = torch.rand(2, h, qb, qb, generator=g)
    causal = torch.ones(qb, qb, dtype=torch.bool).tril()
    diag = torch.eye(qb, dtype=torch.bool)
    sink = select_sink_window(qb, k)
    for sel in (select_topk(scores, k), select_threshold(probs, 0.5), select_window(qb, k).expand(2, h, qb, qb), sink):
        assert not (sel & ~causal).any()
        assert sel[..., diag].all()
    expected = torch.clamp(torch.arange(1, qb + 1), max=k)
    for sel in (select_topk(scores, k), select_window(qb, k), sink):
        assert (sel.sum(-1) == expected).all()
        assert abs(sel.sum().item() / (sel.numel() // (qb * qb)) / (qb * (qb + 1) / 2) - topk_density(qb, k)) < 1e-9
    assert sink[:, 0].all() if k > 1 else True


def test_gate_never_selects_outside_causal_region_on_smollm(smollm, ids):
    model, _ = smollm
    gates = make_gates(model, hidden=16)
    for kwargs in ({"method": "seer_topk", "k": 3}, {"method": "seer_threshold", "threshold": 1e-3}):
        mod = BlockSelect(block=BLOCK, gates=gates, **kwargs)
        seen = []
        orig = mod.selection
        mod.selection = lambda ctx, q, k: seen.append(orig(ctx, q, k)) or seen[-1]
        with torch.no_grad(), attach(model, modifiers=[mod]):
            model(input_ids=ids)
        assert len(seen) == 30
        qb = ids.shape[1] // BLOCK
        causal = torch.ones(qb, qb, dtype=torch.bool).tril()
        for sel in seen:
            assert sel.shape == (1, 3, qb, qb)
            assert not (sel & ~causal).any() and sel[..., torch.eye(qb, dtype=torch.bool)].all()


def test_dense_selection_reproduces_model_and_sparse_changes_it(smollm, ids):
    model, _ = smollm
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with attach(model, modifiers=[BlockSelect("dense", block=BLOCK)]):
            dense = model(input_ids=ids).logits
        win = BlockSelect("window", block=BLOCK, k=1)
        with attach(model, modifiers=[win]):
            sparse = model(input_ids=ids).logits
    assert (dense - ref).abs().max().item() < 1e-3
    assert (sparse - ref).abs().max().item() > 1e-2
    assert abs(win.mean_density() - 8 / 36) < 1e-6  # 8 diagonal tiles of 36 causal ones


def test_oracle_topk_beats_window_at_equal_density(smollm, ids):
    model, _ = smollm
    labels = ids[:, 1:]
    nll = {}
    for method in ("oracle_topk", "window"):
        mod = BlockSelect(method, block=BLOCK, k=2)
        with torch.no_grad(), attach(model, modifiers=[mod]):
            logits = model(input_ids=ids).logits[:, :-1]
        nll[method] = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    assert nll["oracle_topk"] < nll["window"]


def test_a_few_training_steps_reduce_the_kl(smollm, ids):
    model, _ = smollm
    full = calibration_data(model, ids, block=BLOCK)
    assert sorted(full) == list(range(30))
    data = [{i: full[i] for i in (0, 14, 29)}]  # three layers keep the test short; training is per layer
    gates = make_gates(model, hidden=16)
    before = mean_kl(gates, data)
    losses = train_gates(gates, data, steps=20, lr=1e-2)
    after = mean_kl(gates, data)
    assert after < 0.8 * before, (before, after)
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in model.parameters())


def test_target_rows_are_distributions_over_causal_blocks():
    pooled = torch.rand(1, 9, 4, 4)
    t = target_distribution(pooled, 3)
    assert t.shape == (1, 3, 4, 4)
    assert torch.allclose(t.sum(-1), torch.ones(1, 3, 4))
    assert (t.triu(1) == 0).all()


def test_clear_errors():
    with pytest.raises(ValueError, match="block"):
        pool_qk(torch.zeros(1, 3, 100, 8), torch.zeros(1, 1, 100, 8), 64)
    with pytest.raises(ValueError, match="block"):
        PooledAttention(0)
    with pytest.raises(ValueError, match="threshold"):
        BlockSelect("seer_threshold", threshold=1.5, gates={})
    with pytest.raises(ValueError, match="threshold"):
        select_threshold(torch.zeros(1, 1, 2, 2), 0.0)
    with pytest.raises(ValueError, match="k="):
        select_topk(torch.zeros(1, 1, 2, 2), 0)
    with pytest.raises(ValueError, match="method"):
        BlockSelect("nope")
    with pytest.raises(ValueError, match="gates"):
        BlockSelect("seer_topk", k=2)
    gate = AttnGate(1, 8, 4, group=3)
    assert gate(*pool_qk(torch.randn(1, 3, 32, 8), torch.randn(1, 1, 32, 8), 16)).shape == (1, 1, 2, 2)
    with pytest.raises(ValueError, match="k="):
        BlockSelect("sink_window", k=0)


def test_unrotate_inverts_the_models_rotary_embedding(smollm):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, _ = smollm
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 9, 40, 64, generator=g), torch.randn(1, 3, 40, 64, generator=g)
    pos = torch.arange(7, 47)[None]
    cos, sin = model.model.rotary_emb(q, pos)
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    inv = rope_inv_freq(model)
    assert torch.allclose(unrotate(q_rot, inv, pos[0]), q, atol=1e-4)
    assert torch.allclose(unrotate(k_rot, inv, pos[0]), k, atol=1e-4)
    qf, kf = pool_qk(q_rot, k_rot, 8, inv, pos[0])
    ref_q = q.view(1, 3, 3, 5, 8, 64).mean(4).permute(0, 1, 3, 2, 4).reshape(1, 3, 5, 192)
    assert torch.allclose(qf, ref_q, atol=1e-4)
    assert torch.allclose(kf[..., 128:], k.view(1, 3, 5, 8, 64).mean(3), atol=1e-4)


def test_distance_buckets_exact_near_then_logarithmic():
    b = distance_buckets(1600)
    d = torch.arange(1600)
    row = b[1599, 1599 - d]  # bucket of distance d
    assert (row[:8] == torch.arange(8)).all()
    assert (row.diff() >= 0).all() and (row.diff() <= 1).all()
    assert row.max().item() == 23 and row[16].item() == 10


def test_gate_position_terms_reach_the_sink_and_recent_blocks():
    gate = AttnGate(2, 8, 4, group=1)
    with torch.no_grad():
        gate.wq.zero_()
        gate.sink[0] = 20.0  # head 0: all mass on the first block
        gate.dist[1, 0] = 20.0  # head 1: all mass on the diagonal block
    logp = gate(*pool_qk(torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8), 8))
    p = logp.exp()
    assert torch.allclose(p.sum(-1), torch.ones(1, 2, 8), atol=1e-5)
    assert (p[0, 0, :, 0] > 0.99).all()
    assert (p[0, 1].diagonal() > 0.99).all()
    assert torch.isinf(logp[..., 0, 1:]).all()  # causal: nothing above the diagonal


def test_partial_last_block_and_dense_decoding_under_generate(smollm):
    model, tok = smollm
    ids = _ids(tok, 100)  # 100 = 6 blocks of 16 + a partial one
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        dense = BlockSelect("dense", block=BLOCK)
        with attach(model, modifiers=[dense]):
            got = model(input_ids=ids).logits
        assert (got - ref).abs().max().item() < 1e-3
        win = BlockSelect("sink_window", block=BLOCK, k=2)
        with attach(model, modifiers=[win]):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 103)
    assert abs(win.mean_density() - (1 + 2 * 6) / 28) < 1e-6  # 7 blocks: row 0 keeps 1, rows 1-6 keep 2


def test_stacked_gate_computation_equals_each_layers_gate():
    from attnlab.sparse.seer import _batch_loss, gate_kl

    g = torch.Generator().manual_seed(3)
    gates = torch.nn.ModuleDict({str(i): AttnGate(2, 8, 4, group=2) for i in range(3)})
    with torch.no_grad():
        for gate in gates.values():
            gate.dist.normal_(generator=g)
            gate.sink.normal_(generator=g)
    batch = {}
    for i in range(3):
        q, k = pool_qk(torch.randn(1, 4, 48, 8, generator=g), torch.randn(1, 2, 48, 8, generator=g), 8)
        batch[i] = (q, k, target_distribution(torch.rand(1, 4, 6, 6, generator=g), 2))
    per_layer = sum(gate_kl(gates[str(i)](q, k), t) for i, (q, k, t) in batch.items()) / 3
    assert torch.allclose(_batch_loss(gates, batch), per_layer, atol=1e-6)


def test_early_stopping_keeps_the_best_validation_state(smollm, ids):
    model, _ = smollm
    full = calibration_data(model, ids, block=BLOCK)
    val_ids = _ids(smollm[1], 256)[:, 128:]
    val_full = calibration_data(model, val_ids, block=BLOCK)
    data, val = [{i: full[i] for i in (3, 20)}], [{i: val_full[i] for i in (3, 20)}]
    plain = make_gates(model, hidden=16)
    start = mean_kl(plain, val)
    train_gates(plain, data, steps=40, lr=3e-2)
    stopped = make_gates(model, hidden=16)  # same seed: same start, same Adam path
    train_gates(stopped, data, steps=40, lr=3e-2, val=val, eval_every=10)
    assert mean_kl(stopped, val) < start
    assert mean_kl(stopped, val) <= mean_kl(plain, val) + 1e-7
