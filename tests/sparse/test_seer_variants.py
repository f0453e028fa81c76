"""Gate recipes of session 6: rotary block-position terms, the top-blocks KL, the one-hot distance term,
time-limited training, and the benchmark's recipe / method parsing."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnlab.sparse.seer import (
    N_BUCKETS, AttnGate, block_rope_freq, distance_buckets, distance_onehot, gate_kl, gate_log_probs, pool_qk,
    rotate_blocks, target_distribution, train_gates,
)
from attnlab.sparse.seer_prefill import forced_blocks, select_topk


def _bench():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "seer_smollm2.py"
    spec = importlib.util.spec_from_file_location("seer_smollm2_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _kl64(logits: torch.Tensor, target: torch.Tensor, free: torch.Tensor, top: int | None) -> torch.Tensor:
    """float64 re-statement of gate_kl: per row, target over the free blocks, cut to its ``top`` largest,
    renormalised; gate renormalised over the free blocks; KL summed over blocks, mean over rows."""
    b, h, qb, _ = target.shape
    out = torch.zeros(b, h, qb, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(qb):
                cols = free[i].nonzero().flatten().tolist()
                if not cols:
                    continue
                t = target[bi, hi, i, cols].double()
                t = t / t.sum()
                if top is not None and top < len(cols):
                    keep = t.topk(top).indices
                    mask = torch.zeros_like(t, dtype=torch.bool)
                    mask[keep] = True
                    t = torch.where(mask, t, torch.zeros_like(t))
                    t = t / t.sum()
                lg = logits[bi, hi, i, cols].double().log_softmax(-1)
                out[bi, hi, i] = sum(float(t[j]) * (math.log(float(t[j])) - float(lg[j]))
                                     for j in range(len(cols)) if t[j] > 0)
    return out.mean()


@settings(max_examples=25, deadline=None)
@given(qb=st.integers(1, 9), top=st.one_of(st.none(), st.integers(1, 10)), sink=st.booleans(),
       local=st.integers(1, 3), exclude=st.booleans(), seed=st.integers(0, 999))
def test_gate_kl_top_blocks_matches_float64(qb, top, sink, local, exclude, seed):
    g = torch.Generator().manual_seed(seed)
    causal = torch.ones(qb, qb, dtype=torch.bool).tril()
    logits = torch.randn(2, 2, qb, qb, generator=g, dtype=torch.float64).masked_fill(~causal, float("-inf"))
    target = torch.rand(2, 2, qb, qb, generator=g, dtype=torch.float64) * causal
    target = target / target.sum(-1, keepdim=True)
    ex = forced_blocks(qb, sink, local) if exclude else None
    free = causal & ~ex if exclude else causal
    got = gate_kl(logits.log_softmax(-1), target, ex, top)
    assert torch.isfinite(got)
    assert abs(got.item() - _kl64(logits, target, free, top).item()) < 1e-9


def test_top_kl_ignores_the_tail_and_equals_kl_when_top_covers_every_block():
    qb = 6
    causal = torch.ones(qb, qb, dtype=torch.bool).tril()
    target = torch.rand(1, 1, qb, qb, generator=torch.Generator().manual_seed(1)) * causal
    target = target / target.sum(-1, keepdim=True)
    logits = torch.randn(1, 1, qb, qb).masked_fill(~causal, float("-inf"))
    assert torch.allclose(gate_kl(logits.log_softmax(-1), target, top=qb), gate_kl(logits.log_softmax(-1), target))
    # with top=1 only the gate's probability of each row's largest block counts
    best = target.argmax(-1, keepdim=True)
    ref = -logits.log_softmax(-1).gather(-1, best).mean()
    assert torch.allclose(gate_kl(logits.log_softmax(-1), target, top=1), ref, atol=1e-6)
    with pytest.raises(ValueError, match="top"):
        gate_kl(logits.log_softmax(-1), target, top=0)


@pytest.mark.parametrize("qb", [1, 7, 40])
def test_onehot_distance_term_equals_the_gather_and_its_gradient(qb):
    dist = torch.randn(3, 2, N_BUCKETS, dtype=torch.float32, requires_grad=True)
    gathered = dist[..., distance_buckets(qb)]
    w = torch.randn_like(gathered)
    (gathered * w).sum().backward()
    ref = dist.grad.clone()
    dist.grad = None
    via = (dist @ distance_onehot(qb)).unflatten(-1, (qb, qb))
    assert torch.equal(via, gathered)  # one product with 1.0, the rest with 0.0: exact
    (via * w).sum().backward()
    assert torch.allclose(dist.grad, ref, atol=1e-5)


def test_block_rope_scores_depend_on_block_distance_only_and_stay_causal():
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)  # head_dim 8: 4 frequency pairs
    gate = AttnGate(2, 8, hidden=16, group=1, inv_freq=inv_freq, rope_block=4)
    assert torch.allclose(gate.rope_freq, inv_freq.repeat(2) * 4)
    qb = 10
    # the same features in every block: scores then differ only through the block distance
    q = torch.randn(1, 2, 1, 8).expand(1, 2, qb, 8).contiguous()
    k = torch.randn(1, 2, 1, 24).expand(1, 2, qb, 24).contiguous()
    with torch.no_grad():
        gate.dist.normal_()
        raw = gate_log_probs(q, k, gate.wq, gate.wk, gate.dist, torch.zeros(2), gate.rope_freq)
    # raw[i, j] = f(i - j) - log Z_i: against the row's own diagonal, a function of the distance alone
    for d in range(1, qb):
        rel = torch.stack([raw[..., i, i - d] - raw[..., i, i] for i in range(d, qb)], -1)
        assert (rel - rel[..., :1]).abs().max().item() < 1e-4, d
    dep = torch.stack([raw[..., 9, 9 - d] - raw[..., 9, 9] for d in range(1, qb)], -1)
    assert dep.std().item() > 1e-3  # and that function is not flat
    assert torch.isinf(raw[..., 0, 1:]).all() and (raw.exp().sum(-1) - 1).abs().max().item() < 1e-5
    # without rope_freq the rotation is absent: content-only scores are the same for every pair
    flat = gate_log_probs(q, k, gate.wq, gate.wk, torch.zeros(2, N_BUCKETS), torch.zeros(2))
    assert torch.allclose(flat.exp()[0, 0, -1], torch.full((qb,), 1.0 / qb), atol=1e-5)
    sel = select_topk(raw, 3, forced_blocks(qb, True, 2))
    assert not (sel & ~torch.ones(qb, qb, dtype=torch.bool).tril()).any()


def test_rotate_blocks_is_a_rotation_with_relative_dot_products():
    freq = torch.tensor([0.3, 1.7])
    x, y = torch.randn(5, 4), torch.randn(5, 4)
    rx, ry = rotate_blocks(x, freq), rotate_blocks(y, freq)
    assert torch.allclose(rx.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    # block 3 vs block 1 equals block 2 vs block 0 for the same vectors
    same = torch.randn(4)
    r = rotate_blocks(same.expand(4, 4), freq)
    assert torch.allclose(r[3] @ rotate_blocks(y[:1].expand(4, 4), freq)[1],
                          r[2] @ rotate_blocks(y[:1].expand(4, 4), freq)[0], atol=1e-5)


def test_block_rope_clear_errors():
    inv = torch.ones(4)
    with pytest.raises(ValueError, match="inv_freq"):
        block_rope_freq(None, 16, 4)
    with pytest.raises(ValueError, match="hidden"):
        block_rope_freq(inv, 12, 4)
    with pytest.raises(ValueError, match="rope_block"):
        block_rope_freq(inv, 16, 0)
    assert block_rope_freq(inv, 16, None) is None


def _toy_batch(seed: int, layers: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        q, k = pool_qk(torch.randn(1, 2, 32, 8, generator=g), torch.randn(1, 2, 32, 8, generator=g), 4)
        out[i] = (q, k, target_distribution(torch.rand(1, 2, 8, 8, generator=g), 2))
    return out


def test_training_with_rope_and_top_reduces_its_loss_and_time_limit_stops_it():
    from attnlab.sparse.seer import _batch_loss

    inv = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    torch.manual_seed(0)
    gates = torch.nn.ModuleDict({str(i): AttnGate(2, 8, 16, 1, inv, rope_block=4) for i in range(2)})
    data = [_toy_batch(0)]
    before = _batch_loss(gates, data[0], top=3).item()
    losses = train_gates(gates, data, steps=30, lr=3e-2, top=3)
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert _batch_loss(gates, data[0], top=3).item() < before
    short = train_gates(gates, data, steps=1000, lr=3e-2, eval_every=5, time_limit_s=0.0)
    assert len(short) == 5  # the limit is checked at the first evaluation point


def test_benchmark_parses_recipes_and_variant_options():
    bench = _bench()
    assert bench.parse_variant("data:segs=0,steps=9000,loss=top64,rope=1") == (
        "data", {"segs": 0, "steps": 9000, "loss": "top64", "rope": 1})
    assert bench.parse_variant("base") == ("base", {})
    assert bench.parse_variant("q:qstats=3,hidden=512") == ("q", {"qstats": 3, "hidden": 512})
    for bad in ("1x:segs=1", "a:foo=1", "a:loss=top", "a:loss=mse", "a:qstats=2"):
        with pytest.raises(ValueError):
            bench.parse_variant(bad)
    base, kw = bench.parse_method("seer_headk+sink+local2+tmax+vrope")
    assert base == "seer_headk" and kw["gate_variant"] == "rope" and kw["keep_local"] == 2
    with pytest.raises(ValueError, match="seer methods only"):
        bench.parse_method("oracle_topk+vrope")


def test_query_maxima_minima_features_and_gates_that_read_the_means_only():
    g = torch.Generator().manual_seed(5)
    query, key = torch.randn(1, 4, 24, 8, generator=g), torch.randn(1, 2, 24, 8, generator=g)
    q1, k1 = pool_qk(query, key, 4)
    q3, k3 = pool_qk(query, key, 4, q_stats=3)
    assert q3.shape == (1, 2, 6, 3 * 2 * 8) and torch.equal(q3[..., :16], q1) and torch.equal(k3, k1)
    # the maxima of head 1 of group 0 over query block 2 (rows 8-11), float64 re-statement
    ref = query[0, 1, 8:12].double().amax(0)
    assert torch.allclose(q3[0, 0, 2, 16 + 8:16 + 16].double(), ref)
    assert torch.allclose(q3[0, 0, 2, 32 + 8:32 + 16].double(), query[0, 1, 8:12].double().amin(0))
    means_only = AttnGate(2, 8, 16, group=2)
    assert torch.equal(means_only(q3, k3), means_only(q1, k1))
    torch.manual_seed(1)
    plain = AttnGate(2, 8, 16, group=2)
    torch.manual_seed(1)
    rich = AttnGate(2, 8, 16, group=2, q_stats=3)
    assert rich.wq.shape == (2, 48, 16)
    assert torch.equal(rich(q3, k3), plain(q1, k1))  # the extra rows start at zero: the same start
    assert torch.equal(rich.features(query, key, 4)[0], q3)
    logp = rich(q3, k3)
    assert torch.isinf(logp[..., 0, 1:]).all() and (logp.exp().sum(-1) - 1).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="q_stats"):
        pool_qk(query, key, 4, q_stats=2)


def test_gate_ensemble_is_the_renormalised_mean_of_its_members_log_probs():
    from attnlab.sparse.seer import GateEnsemble, ensemble_gates

    g = torch.Generator().manual_seed(7)
    query, key = torch.randn(1, 4, 32, 8, generator=g), torch.randn(1, 2, 32, 8, generator=g)
    torch.manual_seed(0)
    a, b = AttnGate(2, 8, 16, group=2), AttnGate(2, 8, 16, group=2, q_stats=3)
    with torch.no_grad():
        b.wq.normal_()
        a.dist.normal_()
    ens = GateEnsemble([a, b])
    q3, k3 = ens.features(query, key, 4)
    assert q3.shape[-1] == 3 * 16  # pooled for the richest member
    got = ens(q3, k3).double()
    la, lb = a(*a.features(query, key, 4)).double(), b(*b.features(query, key, 4)).double()
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    mean = ((la + lb) / 2).masked_fill(~causal, float("-inf"))
    assert torch.allclose(got, mean.log_softmax(-1), atol=1e-5)
    assert torch.isinf(got[..., 0, 1:]).all()
    one = GateEnsemble([a])
    assert torch.allclose(one(*one.features(query, key, 4)), la.float(), atol=1e-5)
    sets = ensemble_gates([torch.nn.ModuleDict({"0": a}), torch.nn.ModuleDict({"0": b})])
    assert isinstance(sets["0"], GateEnsemble)
    with pytest.raises(ValueError, match="at least one"):
        GateEnsemble([])
    with pytest.raises(ValueError, match="same layers"):
        ensemble_gates([torch.nn.ModuleDict({"0": a}), torch.nn.ModuleDict({"1": b})])


def test_new_gate_kinds_select_causally_keep_forced_blocks_and_spend_exact_counts_on_smollm(smollm):
    from importlib import resources

    from attnlab.hf.attach import attach
    from attnlab.sparse.seer import ensemble_gates, make_gates
    from attnlab.sparse.seer_adaptive import topk_count
    from attnlab.sparse.seer_prefill import BlockSelect

    model, tok = smollm
    text = resources.files("attnlab.data").joinpath("kjv_genesis.txt").read_text()
    ids = tok(text, return_tensors="pt").input_ids[:, :128]
    qb, block = 8, 16
    rope = make_gates(model, hidden=64, rope_block=block)
    q3 = make_gates(model, hidden=64, q_stats=3, seed=1)
    headk = {"method": "seer_headk", "head_k": {i: [3, 4, 6] for i in range(30)}}
    kinds = [("rope", rope, {"method": "seer_topk", "k": 4}), ("q3", q3, headk),
             ("ensemble", ensemble_gates([rope, q3]), headk)]
    causal = torch.ones(qb, qb, dtype=torch.bool).tril()
    forced = forced_blocks(qb, True, 2)
    for name, gates, kw in kinds:  # one forward per gate kind
        mod = BlockSelect(block=block, gates=gates, keep_sink=True, keep_local=2, **kw)
        seen = []
        orig = mod.selection
        mod.selection = lambda ctx, q, k: seen.append(orig(ctx, q, k)) or seen[-1]
        with torch.no_grad(), attach(model, modifiers=[mod]):
            model(input_ids=ids)
        assert len(seen) == 30, name
        for sel in seen:
            assert not (sel & ~causal).any(), name
            assert sel[..., forced & causal].all(), name
            ks = [4] * 3 if "k" in kw else [3, 4, 6]
            assert [int(sel[0, h].sum()) for h in range(3)] == [topk_count(qb, k) for k in ks], name
