"""The ragged cache: attention over what is kept equals the float64 reference that masks the rest."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.kv import Keep
from attnlab.kv.streaming import Streaming
from kv_helpers import ragged_layer, reference_decode


def random_plans(g: torch.Generator, B: int, H_kv: int, T: int, D: int, extras: bool) -> list[list[Keep]]:
    """Per sample: heads split into groups at random, each group keeping a random subset of one size."""
    plans = []
    for _ in range(B):
        perm = torch.randperm(H_kv, generator=g)
        cuts = sorted(set(torch.randint(1, H_kv + 1, (2,), generator=g).tolist()) | {H_kv})
        plan, start = [], 0
        for c in cuts:
            heads = perm[start:c]
            start = c
            if heads.numel() == 0:
                continue
            n = int(torch.randint(1, T + 1, (1,), generator=g))
            index = torch.stack([torch.randperm(T, generator=g)[:n].sort().values for _ in heads])
            kw = {}
            if extras and bool(torch.randint(0, 2, (1,), generator=g)):
                G = heads.numel()
                kw = dict(extra_keys=torch.randn(G, 1, D, generator=g), extra_values=torch.randn(G, 1, D, generator=g),
                          extra_log_weight=torch.rand(G, 1, generator=g) * 3)
            plan.append(Keep(heads, index, **kw))
        plans.append(plan)
    return plans


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), H_kv=st.integers(1, 3), rep=st.sampled_from([1, 3]), T=st.integers(1, 12),
       D=st.sampled_from([4, 8]), Tq=st.integers(1, 3), extras=st.booleans(), seed=st.integers(0, 2**16))
def test_ragged_attention_matches_masked_reference(B, H_kv, rep, T, D, Tq, extras, seed):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, H_kv, T, D, generator=g), torch.randn(B, H_kv, T, D, generator=g)
    plans = random_plans(g, B, H_kv, T, D, extras)
    layer = ragged_layer(k, v, plans, reserve=1)  # reserve 1: decode past it exercises growth
    new_k, new_v = torch.randn(B, H_kv, Tq, D, generator=g), torch.randn(B, H_kv, Tq, D, generator=g)
    layer.update(new_k, new_v)
    q = torch.randn(B, H_kv * rep, Tq, D, generator=g)
    out = layer.attend(q, D ** -0.5)  # (B, Tq, H, D)
    ref = reference_decode(q, k, v, plans, new_k, new_v)
    torch.testing.assert_close(out.transpose(1, 2).double(), ref, atol=2e-5, rtol=1e-4)


def test_batch2_gqa_kept_length_one():
    g = torch.Generator().manual_seed(1)
    B, H_kv, rep, T, D = 2, 3, 3, 7, 8
    k, v = torch.randn(B, H_kv, T, D, generator=g), torch.randn(B, H_kv, T, D, generator=g)
    plans = [[Keep(torch.arange(3), torch.tensor([[6], [0], [3]]))],  # every head keeps one entry
             [Keep(torch.tensor([2]), torch.tensor([[4]])), Keep(torch.tensor([0, 1]), torch.arange(T).expand(2, -1))]]
    layer = ragged_layer(k, v, plans)
    assert sorted(grp.n for grp in layer.groups) == [1, 7]  # length-1 rows of both samples share a group
    for step in range(3):  # several decode steps, each appended and attended
        nk, nv = torch.randn(B, H_kv, 1, D, generator=g), torch.randn(B, H_kv, 1, D, generator=g)
        layer.update(nk, nv)
        q = torch.randn(B, H_kv * rep, 1, D, generator=g)
        out = layer.attend(q, 0.3)
        if step == 0:
            ref = reference_decode(q, k, v, plans, nk, nv, scale=0.3)
            torch.testing.assert_close(out.transpose(1, 2).double(), ref, atol=2e-5, rtol=1e-4)
    assert layer.n_decoded == 3 and layer.get_seq_length() == T + 3
    assert sorted(grp.n for grp in layer.groups) == [4, 10]


def test_kept_bytes_are_the_stored_tensors():
    g = torch.Generator().manual_seed(2)
    B, H_kv, T, D = 2, 3, 9, 8
    k, v = torch.randn(B, H_kv, T, D, generator=g), torch.randn(B, H_kv, T, D, generator=g)
    plans = random_plans(g, B, H_kv, T, D, extras=True)
    layer = ragged_layer(k, v, plans, reserve=5)
    stored = sum(t.numel() * t.element_size() for grp in layer.groups for t in (grp.kept_keys(), grp.kept_values()))
    assert layer.kept_bytes() == stored
    n_entries = sum(kp.index.numel() + (kp.extra_keys.shape[0] * kp.extra_keys.shape[1] if kp.extra_keys is not None
                                        else 0) for plan in plans for kp in plan)
    assert stored == n_entries * 2 * D * 4
    held = sum(t.numel() * t.element_size() for grp in layer.groups
               for t in (grp.keys, grp.values, grp.pos, grp.log_weight, grp.score) if t is not None)
    assert layer.allocated_bytes() == held
    assert layer.full_bytes() == B * H_kv * T * 2 * D * 4


def test_fixed_size_decode_keeps_sinks_and_size():
    g = torch.Generator().manual_seed(3)
    B, H_kv, T, D = 1, 2, 20, 4
    k, v = torch.randn(B, H_kv, T, D, generator=g), torch.randn(B, H_kv, T, D, generator=g)
    policy = Streaming(budget=0.4, n_sink=2)
    from attnlab.kv import RaggedLayer

    layer = RaggedLayer(policy, 0, 1)
    layer.update(k, v)
    layer.set_valid(None, B, T)
    layer.compress()
    (grp,) = layer.groups
    assert grp.n == 8 and grp.pos[0, :8].tolist() == [0, 1, 14, 15, 16, 17, 18, 19]
    for _ in range(10):
        layer.update(torch.randn(B, H_kv, 1, D, generator=g), torch.randn(B, H_kv, 1, D, generator=g))
        layer.attend(torch.randn(B, H_kv, 1, D, generator=g), 0.5)
    assert grp.n == 8 and grp.keys.shape[1] == 8  # constant size, no growth
    assert sorted(grp.pos[0, :8].tolist()) == [0, 1, 24, 25, 26, 27, 28, 29]  # sinks + the 6 newest
    assert math.isclose(layer.kept_bytes() / layer.full_bytes(), 8 / 30)


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), H_kv=st.integers(1, 3), rep=st.sampled_from([1, 3]), T=st.integers(1, 10),
       Tq=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_score_tracking_attention_matches_reference_and_accumulates_mass(B, H_kv, rep, T, Tq, seed):
    """H2O's path (explicit softmax, attention mass added to each slot) gives the reference output, and
    each row's slots gain exactly rep * Tq of mass (every query's probabilities sum to one)."""
    g = torch.Generator().manual_seed(seed)
    D = 8
    k, v = torch.randn(B, H_kv, T, D, generator=g), torch.randn(B, H_kv, T, D, generator=g)
    plans = random_plans(g, B, H_kv, T, D, extras=True)
    layer = ragged_layer(k, v, plans, reserve=1)
    for grp in layer.groups:
        grp.score = torch.zeros(grp.pos.shape, dtype=torch.float32)
    new_k, new_v = torch.randn(B, H_kv, Tq, D, generator=g), torch.randn(B, H_kv, Tq, D, generator=g)
    layer.update(new_k, new_v)
    q = torch.randn(B, H_kv * rep, Tq, D, generator=g)
    out = layer.attend(q, D ** -0.5)
    ref = reference_decode(q, k, v, plans, new_k, new_v)
    torch.testing.assert_close(out.transpose(1, 2).double(), ref, atol=2e-5, rtol=1e-4)
    for grp in layer.groups:
        torch.testing.assert_close(grp.score.sum(1), torch.full((grp.size,), float(rep * Tq)), atol=1e-4, rtol=1e-5)
