"""MoA: plan choice under the budget on constructed profiles (exact spans and indices), profiling and
generation on the real SmolLM2, clear errors."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab import kv
from attnlab.kv import MoA, MoAProfile, PrefillView
from attnlab.kv.moa import choose_plans, far_mass, plan_spans, profile_model
from attnlab.tasks import make_needle
from kv_helpers import kept  # same folder (pytest's rootdir import mode)


def view(T: int, H: int = 2, layer: int = 0, n_layers: int = 1) -> PrefillView:
    return PrefillView(layer, n_layers, torch.randn(H, T, 4), torch.randn(H, T, 4))


def spike_profile(distances: list[int], width: int = 98, n_sink: int = 2) -> MoAProfile:
    """One layer; KV head h puts all its final-query mass at distance distances[h] from the end."""
    far = torch.zeros(1, len(distances), width, dtype=torch.float64)
    for h, d in enumerate(distances):
        far[0, h, d] = 1.0
    return MoAProfile((100.0,), (far,), n_sink)


# spans at N = 100 for alphas (4, 16, 64) x betas (0, 0.5): 4, 54, 16, 66, 64, 114
GRID = dict(alphas=(4, 16, 64), betas=(0.0, 0.5), n_sink=2)


def test_plan_spans_grid():
    assert plan_spans((4, 16, 64), (0.0, 0.5), 100).tolist() == [4, 54, 16, 66, 64, 114]
    assert plan_spans((-50,), (0.25,), 100).tolist() == [1]  # never below one recent token


def test_far_head_gets_its_span_local_head_stays_short():
    # head 0 needs distance 60 (span >= 61): cheapest lossless plan is alpha 64 (2 sinks + 64 = 66 entries);
    # head 1 needs distance 2: alpha 4 (6 entries); 72 entries = budget 0.36 of 2 x 100
    policy = MoA(budget=0.36, profile=spike_profile([60, 2]), **GRID)
    assert policy.plan(100, 1, 2).tolist() == [[66, 6]]
    keeps = policy.select(view(100))
    assert kept(keeps) == {0: [0, 1, *range(36, 100)], 1: [0, 1, 96, 97, 98, 99]}
    assert all(k.fixed_size for k in keeps)


def test_short_budget_sacrifices_the_far_head():
    # 70 entries cannot pay 66 + 6: head 0 loses its mass whatever it keeps, so it keeps the least
    policy = MoA(budget=0.35, profile=spike_profile([60, 2]), **GRID)
    assert policy.plan(100, 1, 2).tolist() == [[6, 6]]


def test_budget_below_every_plan_falls_back_to_one_window():
    policy = MoA(budget=0.05, profile=spike_profile([60, 2]), **GRID)  # 10 entries < 6 + 6
    assert kept(policy.select(view(100))) == {0: [0, 1, 97, 98, 99], 1: [0, 1, 97, 98, 99]}


def test_span_covering_the_prompt_keeps_everything_and_grows():
    policy = MoA(budget=1.0, profile=spike_profile([97, 97]), **GRID)
    (keep,) = policy.select(view(100))
    assert keep.index.tolist() == [list(range(100))] * 2 and not keep.fixed_size


def test_far_mass_excludes_sinks_and_reverses():
    scores = torch.tensor([[2.0, 1.0, 0.0, 3.0, 4.0]])  # normalised by 10; 1 sink
    assert far_mass(scores, 1).tolist() == [[0.4, 0.3, 0.0, 0.1]]
    prof = MoAProfile((5.0,), (far_mass(scores, 1).unsqueeze(0),), 1)
    lost = prof.lost(0, torch.tensor([0, 1, 2, 4, 9]))  # span 0 drops all non-sink mass, span >= 4 none
    torch.testing.assert_close(lost[0, 0], torch.tensor([0.8, 0.4, 0.1, 0.0, 0.0], dtype=torch.float64))


def test_choose_plans_exact_small_instance():
    loss = torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.1, 0.0]])
    cost = torch.tensor([[1.0, 2.0, 5.0], [1.0, 2.0, 5.0]])
    assert choose_plans(loss, cost, 4).tolist() == [1, 1]
    assert choose_plans(loss, cost, 7).tolist() == [2, 1]  # loss 0.1 at cost 7 beats 0.5 at 7 and 0.6 at 4
    assert choose_plans(loss, cost, 1.5) is None


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_choose_plans_fits_and_is_near_brute_force(H, P, seed, frac):
    g = torch.Generator().manual_seed(seed)
    cost = torch.randint(1, 10, (H, P), generator=g).double()
    loss = torch.rand(H, P, generator=g, dtype=torch.float64)
    lo, hi = float(cost.min(1).values.sum()), float(cost.max(1).values.sum())
    capacity = lo + frac * (hi - lo)
    choice = choose_plans(loss, cost, capacity)
    rows = torch.arange(H)
    assert float(cost[rows, choice].sum()) <= capacity + 1e-9
    best = min(float(loss[rows, torch.tensor(c)].sum()) for c in itertools.product(range(P), repeat=H)
               if float(cost[rows, torch.tensor(c)].sum()) <= capacity + 1e-9)
    got = float(loss[rows, choice].sum())
    # Lagrangian + greedy is exact on each head's convex hull; off it the gap is at most one head's loss
    assert got <= best + float(loss.max()) + 1e-9


@pytest.fixture(scope="module")
def small_profile(smollm):
    model, tok = smollm
    return profile_model(model, tok, tasks=("passkey",), lengths=(256,), n_samples=1, max_answer=4)


def test_profile_on_smollm(smollm, small_profile):
    model, _ = smollm
    (far,) = small_profile.far
    cfg = model.config
    assert far.shape[:2] == (cfg.num_hidden_layers, cfg.num_key_value_heads)
    mass = far.sum(-1)  # the rest sits on the 4 sinks
    assert bool((mass > 0).all()) and bool((mass <= 1 + 1e-9).all())
    assert 200 < small_profile.lengths[0] <= 256 + 4  # prompt (at most 256 tokens) plus the dense answer


@pytest.mark.parametrize("budget", [0.2, 0.5])
def test_generate_on_smollm_respects_budget(smollm, small_profile, budget):
    model, tok = smollm
    ids = torch.tensor([make_needle(tok, length=300, n_samples=1, seed=4)[0].input_ids])
    T, new = ids.shape[1], 6
    policy = MoA(budget=budget, profile=small_profile)
    out, cache = kv.generate(model, ids, policy, max_new_tokens=new, min_new_tokens=new)
    assert out.shape == (1, T + new)
    plan = policy.plan(T, model.config.num_hidden_layers, model.config.num_key_value_heads)
    assert int(plan.sum()) <= budget * plan.numel() * T
    assert cache.kept_fraction() <= budget
    for layer, want in zip(cache.layers, plan):
        sizes = {int(r): g.n for g in layer.groups for r in g.rows}
        for h, n in enumerate(want.tolist()):  # windows keep their size while decoding; sinks stay
            assert sizes[h] == (n if n < T else T + new - 1)
        for g in layer.groups:
            assert (g.pos[:, :4] == torch.arange(4)).all()


def test_bad_arguments(small_profile):
    with pytest.raises(ValueError, match="budget"):
        MoA(budget=0)
    with pytest.raises(ValueError, match="betas"):
        MoA(budget=0.3, betas=(1.5,))
    with pytest.raises(ValueError, match="alphas"):
        MoA(budget=0.3, alphas=())
    with pytest.raises(ValueError, match="calibration"):
        MoA(budget=0.3, calibration=(("passkey",), (0,), 1))
    with pytest.raises(ValueError, match="sinks"):
        MoA(budget=0.3, profile=small_profile, n_sink=2)
    with pytest.raises(ValueError, match="profile"):
        MoA(budget=0.3).plan(100, 30, 3)
    with pytest.raises(ValueError, match="layers"):
        MoA(budget=0.3, profile=small_profile).plan(100, 2, 2)
    assert isinstance(kv.make_policy("moa", budget=0.3), MoA)
