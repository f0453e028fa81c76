"""Packed multi-group layers (attnlab.kv.packed) on the CPU through the exact segment loop: the same outputs
as the group path and as a float64 model of every row (appends, StreamingLLM rings that evict, growth past
the reserve, GQA, batch > 1, rows of different capacities), the same bytes, and the same tokens on SmolLM2."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab import kv
from attnlab.kv import Keep, RaggedLayer
from attnlab.kv.packed import segment_attention
from attnlab.kv.streaming import Streaming
from attnlab.tasks import make_needle
from kv_helpers import GivenPolicy


@dataclass
class GivenRings(GivenPolicy):
    """Keeps the given plans; fixed-size groups evict as StreamingLLM does (oldest non-sink entry)."""

    n_sink: int = 2

    def evict(self, group, position):
        return Streaming.evict(self, group, position)


def random_plans(g: torch.Generator, B: int, H_kv: int, T: int) -> list[list[Keep]]:
    """Per sample: heads split into up to three groups, each keeping a random ascending subset of one size,
    appending or (at random) a fixed-size ring."""
    plans = []
    for _ in range(B):
        perm = torch.randperm(H_kv, generator=g)
        cuts = sorted(set(torch.randint(1, H_kv + 1, (2,), generator=g).tolist()) | {H_kv})
        plan, start = [], 0
        for c in cuts:
            heads, start = perm[start:c], c
            if heads.numel() == 0:
                continue
            n = int(torch.randint(1, T + 1, (1,), generator=g))
            index = torch.stack([torch.randperm(T, generator=g)[:n].sort().values for _ in heads])
            plan.append(Keep(heads, index, fixed_size=bool(torch.randint(0, 2, (1,), generator=g))))
        plans.append(plan)
    return plans


class RowModel:
    """float64 model of every row: a list of (position, key, value); rings drop the oldest non-sink entry."""

    def __init__(self, keys, values, plans, n_sink: int):
        self.rows, self.ring, self.n_sink = {}, {}, n_sink
        H = keys.shape[1]
        for b, plan in enumerate(plans):
            for keep in plan:
                for i, h in enumerate(keep.heads.tolist()):
                    idx = keep.index[i].tolist()
                    self.rows[b * H + h] = [(p, keys[b, h, p].double(), values[b, h, p].double()) for p in idx]
                    self.ring[b * H + h] = keep.fixed_size

    def step(self, new_k, new_v, position: int) -> None:
        H = new_k.shape[1]
        for r, entries in self.rows.items():
            if self.ring[r]:
                sinks = min(self.n_sink, len(entries) - 1)
                order = sorted(range(len(entries)), key=lambda i: entries[i][0])
                entries.pop(order[sinks])
            entries.append((position, new_k[r // H, r % H, 0].double(), new_v[r // H, r % H, 0].double()))

    def attend(self, q, scale: float):
        """q (B, H_kv * rep, 1, D) -> (B, 1, H_kv * rep, D_v) float64."""
        B, Hq, _, D = q.shape
        H = len(self.rows) // B
        rep = Hq // H
        out = torch.zeros(B, 1, Hq, D, dtype=torch.float64)
        for r, entries in self.rows.items():
            K = torch.stack([e[1] for e in entries])
            V = torch.stack([e[2] for e in entries])
            qr = q[r // H, (r % H) * rep: (r % H + 1) * rep, 0].double()  # (rep, D)
            out[r // H, 0, (r % H) * rep: (r % H + 1) * rep] = torch.softmax(qr @ K.T * scale, -1) @ V
        return out

    def lengths(self) -> list[int]:
        return [len(self.rows[r]) for r in sorted(self.rows)]


def layers(keys, values, plans, n_sink: int, reserve: int) -> tuple[RaggedLayer, RaggedLayer]:
    """(group-path layer, packed layer) that prefilled the same keys and kept the same plans."""
    out = []
    for packed in (False, True):
        B, _, T, _ = keys.shape
        layer = RaggedLayer(GivenRings(plans=plans, n_sink=n_sink), 0, 1, reserve=reserve, packed=packed)
        layer.update(keys, values)
        layer.set_valid(None, B, T)
        layer.compress()
        out.append(layer)
    return out[0], out[1]


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), H_kv=st.integers(2, 3), rep=st.sampled_from([1, 3]), T=st.integers(1, 12),
       D=st.sampled_from([4, 8]), steps=st.integers(1, 9), reserve=st.integers(1, 3), n_sink=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_packed_matches_group_path_and_float64_rows(B, H_kv, rep, T, D, steps, reserve, n_sink, seed):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, H_kv, T, D, generator=g), torch.randn(B, H_kv, T, D, generator=g)
    plans = random_plans(g, B, H_kv, T)
    grouped, packed = layers(k, v, plans, n_sink, reserve)
    model = RowModel(k, v, plans, n_sink)
    assert (packed.packed is not None) == (grouped.n_groups > 1)  # several groups: packed
    entry = 2 * D * 4
    for step in range(steps):  # steps > reserve: appending rows grow
        nk, nv = torch.randn(B, H_kv, 1, D, generator=g), torch.randn(B, H_kv, 1, D, generator=g)
        q = torch.randn(B, H_kv * rep, 1, D, generator=g)
        for layer in (grouped, packed):
            layer.update(nk, nv)
        model.step(nk, nv, T + step)
        want = model.attend(q, D ** -0.5)
        got_p, got_g = packed.attend(q, D ** -0.5), grouped.attend(q, D ** -0.5)
        torch.testing.assert_close(got_p.double(), want, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got_p, got_g, atol=2e-6, rtol=1e-5)
        assert packed.kept_bytes() == grouped.kept_bytes() == sum(model.lengths()) * entry
        assert packed.full_bytes() == grouped.full_bytes()
    if packed.packed is not None:  # bookkeeping: each row's slots hold exactly the model's positions
        p = packed.packed
        assert p.lengths() == model.lengths()
        for r, n in enumerate(p.lengths()):
            held = p.positions()[p.start[r]: p.start[r] + n].tolist()
            assert sorted(held) == sorted(e[0] for e in model.rows[r])
        assert packed.allocated_bytes() > packed.kept_bytes()  # the slack is allocated, not kept


def test_multi_token_step_unpacks_exactly():
    """T_q > 1 (e.g. assisted decoding) turns the packed layer back into groups: same outputs as the group path
    before, during and after, rings that evicted included."""
    g = torch.Generator().manual_seed(5)
    B, H_kv, rep, T, D = 2, 3, 3, 10, 8
    k, v = torch.randn(B, H_kv, T, D, generator=g), torch.randn(B, H_kv, T, D, generator=g)
    plans = [[Keep(torch.tensor([0]), torch.arange(T)[None]),
              Keep(torch.tensor([1, 2]), torch.tensor([[0, 1, 5, 8], [0, 2, 3, 9]]), fixed_size=True)],
             [Keep(torch.tensor([0, 1, 2]), torch.tensor([[1, 2], [3, 4], [0, 9]]))]]
    grouped, packed = layers(k, v, plans, 1, 2)
    assert packed.packed is not None and packed.n_groups == grouped.n_groups == 3
    for t in (1, 1, 1, 2, 1, 3, 1):
        nk, nv = torch.randn(B, H_kv, t, D, generator=g), torch.randn(B, H_kv, t, D, generator=g)
        q = torch.randn(B, H_kv * rep, t, D, generator=g)
        for layer in (grouped, packed):
            layer.update(nk, nv)
        torch.testing.assert_close(packed.attend(q, 0.4), grouped.attend(q, 0.4), atol=2e-6, rtol=1e-5)
        assert packed.kept_bytes() == grouped.kept_bytes()
    assert packed.packed is None
    assert [(x.n, x.evicted, x.ring, x.rows.tolist()) for x in packed.groups] == \
        [(x.n, x.evicted, x.ring, x.rows.tolist()) for x in grouped.groups]


def test_single_group_and_log_weight_layers_stay_on_the_group_path():
    g = torch.Generator().manual_seed(6)
    B, H_kv, T, D = 1, 3, 6, 4
    k, v = torch.randn(B, H_kv, T, D, generator=g), torch.randn(B, H_kv, T, D, generator=g)
    one = [[Keep(torch.arange(3), torch.tensor([[0, 2], [1, 3], [4, 5]]))]]
    comp = [[Keep(torch.tensor([0]), torch.arange(T)[None]),
             Keep(torch.tensor([1, 2]), torch.tensor([[4, 5], [3, 5]]), torch.randn(2, 1, D), torch.randn(2, 1, D),
                  torch.ones(2, 1))]]
    for plans in (one, comp):
        _, packed = layers(k, v, plans, 0, 2)
        assert packed.packed is None and packed.groups


@settings(max_examples=20, deadline=None)
@given(lens=st.lists(st.tuples(st.integers(1, 9), st.integers(0, 4)), min_size=1, max_size=5),
       rep=st.integers(1, 3), seed=st.integers(0, 999))
def test_segment_loop_is_attention_per_row_with_gaps(lens, rep, seed):
    """The CPU stand-in of the varlen kernels: rows (length, slack after it), gaps are zero-query segments."""
    g = torch.Generator().manual_seed(seed)
    D = 8
    S = sum(n + gap for n, gap in lens)
    k, v = torch.randn(S, 1, D, generator=g, dtype=torch.float64), torch.randn(S, 1, D, generator=g, dtype=torch.float64)
    q = torch.randn(len(lens) * rep, 1, D, generator=g, dtype=torch.float64)
    cu_k, cu_q, start = [], [], 0
    for r, (n, gap) in enumerate(lens):
        cu_k += [start, start + n]
        cu_q += [r * rep, (r + 1) * rep]
        start += n + gap
    out = segment_attention(q, k, v, torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32),
                            rep, max(max(n, gap) for n, gap in lens), 0.3)
    for r, (n, _) in enumerate(lens):
        s = cu_k[2 * r]
        p = torch.softmax(q[r * rep:(r + 1) * rep, 0] @ k[s:s + n, 0].T * 0.3, -1)
        torch.testing.assert_close(out[r * rep:(r + 1) * rep, 0], p @ v[s:s + n, 0])


# ---- the real model


def synthetic_policies(model) -> dict[str, kv.Policy]:
    """MoA and Task-KV with synthetic calibration (several groups per layer, as at 4K) and full."""
    from test_decode_ops import policies

    p = policies(model)
    return {name: p[name] for name in ("full", "moa", "task_kv")}


def generate(model, ids, mask, policy, packed: bool | None, new: int):
    with kv.apply(model, policy) as session:
        cache = session.new_cache(reserve=2)  # < new: packed rows grow while generating
        cache.set_packed(packed)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, **kv.cache_kwargs(model, cache), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=0)
    return out, cache


def test_packed_generation_equals_group_path_and_full_equals_plain(smollm):
    """Batch 2, left-padded (different prompt lengths), SmolLM2's GQA (rep 3): packed MoA / Task-KV give the
    group path's tokens; full (packed too: its two samples keep different numbers of entries) still gives
    plain generate()'s."""
    model, tok = smollm
    a = list(make_needle(tok, length=160, n_samples=1, seed=4)[0].input_ids)
    b = list(make_needle(tok, length=128, n_samples=1, seed=5)[0].input_ids)
    T = max(len(a), len(b))
    ids = torch.tensor([[0] * (T - len(a)) + a, [0] * (T - len(b)) + b])
    mask = torch.tensor([[0] * (T - len(a)) + [1] * len(a), [0] * (T - len(b)) + [1] * len(b)])
    new = 4
    for name, policy in synthetic_policies(model).items():
        packed_out, cache = generate(model, ids, mask, policy, True, new)
        if name == "full":
            with torch.no_grad():
                plain = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                       do_sample=False, pad_token_id=0)
            assert torch.equal(packed_out, plain)
            # samples of different lengths keep different numbers of entries: two groups, packed, per layer
            assert cache.packed_layers() == len(cache.layers)
            continue
        group_out, group_cache = generate(model, ids, mask, policy, False, new)
        assert cache.packed_layers() == sum(layer.n_groups > 1 for layer in group_cache.layers) > 0, name
        assert torch.equal(packed_out, group_out), name
        assert cache.kept_bytes() == group_cache.kept_bytes(), name
        assert math.isclose(cache.kept_fraction(), group_cache.kept_fraction())


def test_cpu_default_is_the_group_path(smollm):
    model, tok = smollm
    ids = torch.tensor([make_needle(tok, length=128, n_samples=1, seed=6)[0].input_ids])
    _, cache = generate(model, ids, torch.ones_like(ids), synthetic_policies(model)["task_kv"], None, 2)
    assert cache.packed_layers() == 0 and any(layer.n_groups > 1 for layer in cache.layers)


@pytest.mark.parametrize("bad", [0, 5])
def test_packed_rows_reject_an_unexpected_position(bad):
    g = torch.Generator().manual_seed(7)
    k, v = torch.randn(1, 2, 6, 4, generator=g), torch.randn(1, 2, 6, 4, generator=g)
    plans = [[Keep(torch.tensor([0]), torch.arange(6)[None]), Keep(torch.tensor([1]), torch.tensor([[2, 5]]))]]
    _, packed = layers(k, v, plans, 0, 2)
    with pytest.raises(ValueError, match="position"):
        packed.packed.append(torch.randn(2, 1, 4), torch.randn(2, 1, 4), bad)
