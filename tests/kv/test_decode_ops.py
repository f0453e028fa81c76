"""Decode cost of each policy on the real SmolLM2, counted in aten ops (the GPU-independent proxy for
decode speed on a launch-bound GPU): no host-device syncs, ring eviction costs what an append costs,
multi-group layers need no per-group gathers; and the host-side ring slot equals the positional answer."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab import kv
from attnlab.kv import MoA, MoAProfile, RaggedLayer, TaskKV
from attnlab.kv.session import OpCounter
from attnlab.kv.streaming import Streaming
from attnlab.tasks import make_needle

PROTECTED = torch.tensor([[14, 1], [18, 2], [17, 1], [23, 0]])  # as tests/kv/test_generate.py
NEW = 3  # prefill + two decode forwards; the second is counted (the first makes one-time helpers)


def far_head_profile(n_layers: int, n_kv: int, width: int = 400) -> MoAProfile:
    """KV head h of every layer looks at distance 10 ** h from the end: spans of every size, so MoA
    layers hold several groups (the case that costs extra ops)."""
    far = torch.zeros(n_layers, n_kv, width, dtype=torch.float64)
    for h in range(n_kv):
        far[:, h, min(width - 1, 10 ** h)] = 1.0
    return MoAProfile((float(width),), (far,), 4)


def policies(model) -> dict[str, kv.Policy]:
    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    distance = torch.zeros(L, H, dtype=torch.float64)
    distance[::3, 1] = 1.0  # a heterogeneous head in every third layer: two groups there
    return {"full": kv.Full(), "streaming": kv.Streaming(budget=0.3), "snapkv": kv.SnapKV(budget=0.3),
            "h2o": kv.H2O(budget=0.3), "razor": kv.Razor(budget=0.3, protected=PROTECTED, min_window=8),
            "moa": MoA(budget=0.3, profile=far_head_profile(L, H), alphas=(16, 64), betas=(0.0, 0.5, 1.0)),
            "task_kv": TaskKV(budget=0.3, distance=distance, separator=0.5, min_keep=8)}


def last_decode_step(model, ids, policy, packed: bool | None = None,
                     new: int = NEW) -> tuple[OpCounter, kv.RaggedCache, torch.Tensor]:
    """(ops of the second decode forward, cache, generated ids) for ``new`` new tokens on the model's device
    (fixed-size caches evict from the first decode forward on)."""
    state = {"i": 0, "c": None, "last": None}

    def pre(*_):
        if state["i"] == 2:
            state["c"] = OpCounter()
            state["c"].__enter__()

    def post(*_):
        if state["c"] is not None:
            state["c"].__exit__(None, None, None)
            state["last"], state["c"] = state["c"], None
        state["i"] += 1

    with kv.apply(model, policy) as session:
        cache = session.new_cache(reserve=new + 1)
        cache.set_packed(packed)
        hooks = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
        try:
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), **kv.cache_kwargs(model, cache),
                                     max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        finally:
            for h in hooks:
                h.remove()
    return state["last"], cache, out


@pytest.fixture(scope="module")
def counts(smollm):
    model, tok = smollm
    ids = torch.tensor([make_needle(tok, length=128, n_samples=1, seed=2)[0].input_ids]).expand(2, -1).contiguous()
    return {name: last_decode_step(model, ids, p) for name, p in policies(model).items()}


@pytest.fixture(scope="module")
def packed_counts(smollm):
    """MoA and Task-KV with their multi-group layers packed (on the CPU through the exact segment loop, a
    custom op: one dispatched op per call, as the CUDA varlen kernels are)."""
    model, tok = smollm
    ids = torch.tensor([make_needle(tok, length=128, n_samples=1, seed=2)[0].input_ids]).expand(2, -1).contiguous()
    pols = policies(model)
    return {name: last_decode_step(model, ids, pols[name], packed=True) for name in ("moa", "task_kv")}


def test_packed_multi_group_layers_cost_fewer_ops_than_full(counts, packed_counts):
    """One varlen call + index_copy_ k, index_copy_ v per packed layer (positions are written lazily), against
    the plain path's SDPA + copy_ k, copy_ v, fill_ pos: one op fewer than full per packed layer (on the
    group path moa / task_kv cost more than full). On CUDA the call is varlen_attn (fp16 / bf16) or _efficient_attention_forward
    (fp32), also one dispatched op each; tests/kv/test_packed_gpu.py counts it there."""
    full = counts["full"][0]
    for name, (c, cache, _) in packed_counts.items():
        n_packed = cache.packed_layers()
        assert n_packed == sum(layer.n_groups > 1 for layer in counts[name][1].layers) > 0, name
        assert c.syncs == 0, name
        assert c.ops <= full.ops - n_packed < full.ops < counts[name][0].ops, (name, c.ops, full.ops, counts[name][0].ops)
        assert c.by_op["segment_attention"] == n_packed, name
        assert c.by_op["index_copy_"] == 2 * n_packed and "index_fill_" not in c.by_op, name
        assert not {"index_select", "index", "scatter_"} & set(c.by_op), (name, c.by_op)


def test_no_policy_waits_for_the_device_while_decoding(counts):
    for name, (c, _, _) in counts.items():
        assert c.syncs == 0, (name, {k: v for k, v in c.by_op.items() if k in ("_local_scalar_dense", "nonzero")})


def test_ring_eviction_costs_what_an_append_costs(counts):
    assert counts["streaming"][0].by_op == counts["full"][0].by_op
    assert counts["snapkv"][0].ops == counts["full"][0].ops


def test_groups_need_no_per_group_gathers_or_searches(counts, smollm):
    model, _ = smollm
    n_layers = model.config.num_hidden_layers
    for name, (c, cache, _) in counts.items():
        assert not {"index", "index_put_", "kthvalue", "nonzero", "arange"} & set(c.by_op), (name, c.by_op)
        multi = sum(len(layer.groups) > 1 for layer in cache.layers)
        if name in ("moa", "task_kv", "razor"):
            assert multi > 0, name  # the case under test: some layers hold several groups
        # one permutation of new keys, values and queries and one of the outputs per multi-group layer
        assert c.by_op.get("index_select", 0) <= 4 * multi, (name, c.by_op)
    # H2O: probabilities (baddbmm, softmax, baddbmm_ adding each slot's mass, bmm for one SDPA), eviction
    # (ge, masked_fill, argmin) and scatters for the overwrite: 7 ops per layer over the full cache, no more
    assert counts["h2o"][0].ops <= counts["full"][0].ops + 7 * n_layers


def ring_layer(T: int, budget: float, n_sink: int, B: int, seed: int) -> RaggedLayer:
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, 2, T, 4, generator=g), torch.randn(B, 2, T, 4, generator=g)
    layer = RaggedLayer(Streaming(budget=budget, n_sink=n_sink), 0, 1)
    layer.update(k, v)
    valid = None
    if B > 1:  # the second sample is left-padded by 3: its positions start at 3
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[1, :3] = False
    layer.set_valid(valid, B, T)
    layer.compress()
    return layer


@settings(max_examples=30, deadline=None)
@given(T=st.integers(8, 40), budget=st.floats(0.05, 1.0), n_sink=st.integers(0, 5), B=st.integers(1, 2),
       steps=st.integers(1, 60), seed=st.integers(0, 999))
def test_host_ring_slot_is_the_oldest_non_sink_entry(T, budget, n_sink, B, steps, seed):
    """The int slot StreamingLLM evicts while the group is a ring equals the positional answer
    (the (sinks + 1)-th smallest position) for every row, step after step, padding included."""
    layer = ring_layer(T, budget, n_sink, B, seed)
    policy = layer.policy
    g = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        for grp in layer.groups:
            slot = policy.evict(grp, T + step)
            assert isinstance(slot, int)
            grp.ring = False
            assert policy.evict(grp, T + step).tolist() == [slot] * grp.size
            grp.ring = True
        layer.update(torch.randn(B, 2, 1, 4, generator=g), torch.randn(B, 2, 1, 4, generator=g))
    for grp in layer.groups:
        pos = grp.pos[:, : grp.n].sort(1).values
        sinks = min(n_sink, grp.n - 1)
        newest = torch.arange(T + steps - (grp.n - sinks), T + steps)
        for r in range(grp.size):
            first = 3 if B > 1 and int(grp.rows[r]) >= 2 else 0  # sample 1's real tokens start at 3
            assert pos[r, :sinks].tolist() == list(range(first, first + sinks))
            assert pos[r, sinks:].tolist() == newest.tolist()


def test_append_after_eviction_leaves_the_ring_and_stays_correct():
    layer = ring_layer(20, 0.4, 2, 1, 0)
    (grp,) = layer.groups
    for step in range(3):
        layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    layer.update(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))  # two tokens at once: appended
    assert not grp.ring and grp.n == 10
    for step in range(5):
        layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    assert grp.n == 10 and grp.pos[0, :10].sort().values.tolist() == [0, 1] + list(range(22, 30))
