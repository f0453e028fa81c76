"""Razor's ``snap_share`` option (beyond the paper): SnapKV-chosen middle entries in the compressed heads.

Invariants: protected heads keep everything, sinks and the (shorter) recent window are never dropped,
the chosen middle entries are the top pooled votes, the compensation token is the mean of exactly the
entries each head dropped, and the option costs exactly the bytes of the paper's method.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab import kv
from attnlab.kv import PrefillView, Razor
from attnlab.kv.base import top_k_sorted
from attnlab.kv.razor import max_pool_votes
from attnlab.kv.scores import WINDOW
from attnlab.kv.snapkv import pool_votes
from attnlab.tasks import make_needle


def make_view(T: int, H: int, layer: int, n_layers: int, seed: int, D: int = 4) -> PrefillView:
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(H, T, D, generator=g), torch.randn(H, T, D, generator=g)
    scores = torch.rand(H, T, generator=g)
    return PrefillView(layer, n_layers, keys, values, scores)


def by_head(keeps) -> dict[int, tuple]:
    """{kv head: (kept positions, extra key, extra value, log weight) }."""
    out = {}
    for k in keeps:
        for g, h in enumerate(k.heads.tolist()):
            extra = (None, None, None) if k.extra_keys is None else (
                k.extra_keys[g, 0], k.extra_values[g, 0], float(k.extra_log_weight[g, 0]))
            out[h] = (k.index[g].tolist(), *extra)
    return out


def test_snap_keeps_top_votes_in_the_middle_and_the_mean_of_the_rest():
    T, H = 200, 2
    v = make_view(T, H, layer=0, n_layers=2, seed=0)
    scores = v.scores.clone()
    scores[0, 50], scores[0, 120] = 50.0, 40.0  # head 0's two clear winners (pooled over 5 positions)
    scores[0, :4] = scores[0, 160:] = 100.0  # sinks and recent tokens: kept anyway, never "chosen"
    v = PrefillView(0, 2, v.keys, v.values, scores)
    policy = Razor(budget=0.5, protected=torch.tensor([[0, 1]]), n_sink=4, snap_share=0.25)
    mask, window = policy.plan(T, 2, H)
    assert mask[0, 1] and window == (400 - 200) // 3 - 4 - 1  # 400 entries - 200 protected, over 3 heads
    n_snap, recent = policy.split_window(window)
    assert n_snap == math.floor(0.25 * window) and n_snap + recent == window and recent >= WINDOW
    got = by_head(policy.select(v))
    assert got[1][0] == list(range(T)) and got[1][1] is None  # protected: everything, no extra entry
    index, k_hat, v_hat, log_w = got[0]
    start = T - recent
    assert index[:4] == [0, 1, 2, 3] and index[-recent:] == list(range(start, T))
    middle = index[4:-recent]
    expect = pool_votes(scores[:1, 4:start], 5)[0].argsort(descending=True, stable=True)[:n_snap] + 4
    assert middle == sorted(expect.tolist()) and {50, 120} <= set(middle)
    assert len(index) == 4 + window and index == sorted(set(index))
    dropped = sorted(set(range(T)) - set(index))
    assert len(dropped) == T - 4 - window and log_w == pytest.approx(math.log(len(dropped)))
    torch.testing.assert_close(k_hat, v.keys[0, dropped].mean(0))
    torch.testing.assert_close(v_hat, v.values[0, dropped].mean(0))


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 300), H=st.integers(1, 3), n_layers=st.integers(1, 3),
       budget=st.floats(0.05, 1.0), share=st.floats(0.0, 0.95), n_sink=st.integers(0, 6),
       n_protect=st.integers(0, 3), comp=st.booleans(), seed=st.integers(0, 10))
def test_snap_invariants_and_equal_bytes(T, H, n_layers, budget, share, n_sink, n_protect, comp, seed):
    g = torch.Generator().manual_seed(seed)
    cells = torch.stack([torch.randint(0, n_layers, (n_protect,), generator=g),
                         torch.randint(0, H, (n_protect,), generator=g)], 1)
    kw = dict(budget=budget, protected=cells, n_sink=n_sink, min_window=4, compensation=comp)
    snap, paper = Razor(snap_share=share, **kw), Razor(snap_share=0.0, **kw)
    mask, window = snap.plan(T, n_layers, H)
    assert torch.equal(mask, paper.plan(T, n_layers, H)[0])  # the option never changes the protected heads
    n_snap, recent = snap.split_window(window)
    assert n_snap + recent == window and (n_snap == 0 or recent >= WINDOW)
    for layer in range(n_layers):
        v = make_view(T, H, layer, n_layers, seed)
        a, b = by_head(snap.select(v)), by_head(paper.select(v))
        assert sorted(a) == list(range(H))
        for h in range(H):
            index = a[h][0]
            assert index == sorted(set(index)) and all(0 <= i < T for i in index)
            if mask[layer, h]:
                assert index == list(range(T)) and a[h][1] is None
                continue
            # equal bytes: as many entries (kept + compensation) as the paper's method
            assert len(index) + (a[h][1] is not None) == len(b[h][0]) + (b[h][1] is not None)
            sinks = min(n_sink, T)
            assert set(range(sinks)) <= set(index)  # sinks never evicted
            assert set(range(max(sinks, T - recent), T)) <= set(index)  # nor the recent window
            if a[h][1] is not None:
                dropped = sorted(set(range(T)) - set(index))
                torch.testing.assert_close(a[h][1], v.keys[h, dropped].mean(0))
                assert a[h][3] == pytest.approx(math.log(len(dropped)))
            else:
                assert not comp or len(index) == T


def test_snap_share_zero_is_the_paper_method_and_the_default_is_half():
    v = make_view(120, 3, layer=1, n_layers=2, seed=4)
    kw = dict(budget=0.4, protected=torch.tensor([[1, 2]]), n_sink=4, min_window=8)
    paper = Razor(snap_share=0.0, **kw)
    assert paper.scores is None and Razor(**kw).scores == "window" and Razor(**kw).snap_share == 0.5
    got = by_head(paper.select(PrefillView(1, 2, v.keys, v.values, None)))  # needs no scores
    _, window = paper.plan(120, 2, 3)
    for h in range(3):
        if h == 2:
            assert got[h][0] == list(range(120)) and got[h][1] is None
            continue
        assert got[h][0] == [0, 1, 2, 3, *range(120 - window, 120)]  # sinks + one recent span
        torch.testing.assert_close(got[h][1], v.keys[h, 4:120 - window].mean(0))


@pytest.mark.parametrize("kw, arg", [(dict(snap_share=1.0), "snap_share"), (dict(snap_share=-0.1), "snap_share"),
                                     (dict(snap_share=True), "snap_share"), (dict(snap_share="0.5"), "snap_share"),
                                     (dict(snap_kernel=4), "snap_kernel"), (dict(snap_kernel=0), "snap_kernel"),
                                     (dict(snap_pool="mean"), "snap_pool")])
def test_bad_snap_arguments(kw, arg):
    with pytest.raises(ValueError, match=arg):
        Razor(budget=0.3, **kw)


@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 60), H=st.integers(1, 3), kernel=st.sampled_from([1, 3, 5, 9]), seed=st.integers(0, 99))
def test_max_pool_votes_against_a_loop(N, H, kernel, seed):
    votes = torch.rand(H, N, generator=torch.Generator().manual_seed(seed))
    centred, right = max_pool_votes(votes, kernel), max_pool_votes(votes, kernel, right=True)
    assert centred.shape == right.shape == (H, N)
    r = kernel // 2
    for p in range(N):
        assert torch.equal(centred[:, p], votes[:, max(0, p - r):p + r + 1].max(1).values)
        assert torch.equal(right[:, p], votes[:, max(0, p - kernel + 1):p + 1].max(1).values)


@pytest.mark.parametrize("pool", ["max", "right"])
def test_span_pooling_keeps_the_span_after_a_peak(pool):
    """A single vote peak brings its neighbours (max) or the ``kernel - 1`` tokens after it (right), at equal bytes."""
    T, H, kernel = 300, 1, 9
    v = make_view(T, H, layer=0, n_layers=1, seed=3)
    scores = torch.zeros(H, T)
    scores[0, 100] = 10.0
    scores[0, 4:250] += torch.linspace(0, 1e-3, 246)  # a weak ramp orders the rest: the latest win ties
    v = PrefillView(0, 1, v.keys, v.values, scores)
    kw = dict(budget=0.3, protected=torch.zeros(0, 2, dtype=torch.long), n_sink=4, snap_share=0.5, snap_kernel=kernel)
    span, avg = Razor(snap_pool=pool, **kw), Razor(**kw)
    (ka,), (kb,) = span.select(v), avg.select(v)
    assert ka.index.shape == kb.index.shape  # same bytes
    n_snap, recent = span.split_window(span.plan(T, 1, H)[1])
    start = T - recent
    pooled = max_pool_votes(scores[:, 4:start], kernel, right=pool == "right")
    expect = top_k_sorted(pooled, n_snap)[0] + 4
    assert ka.index[0, 4:4 + n_snap].tolist() == expect.tolist()  # the middle entries: top pooled votes
    want = range(96, 105) if pool == "max" else range(100, 109)
    assert set(want) <= set(ka.index[0].tolist()) and n_snap >= len(want)
    if pool == "right":  # centred average pooling would keep the tokens before the peak instead
        assert not set(range(100, 109)) <= set(kb.index[0].tolist())


def test_snap_needs_window_scores():
    v = make_view(300, 2, layer=0, n_layers=1, seed=1)
    v = PrefillView(0, 1, v.keys, v.values, None)
    with pytest.raises(ValueError, match="scores"):
        Razor(budget=0.5, protected=torch.zeros(0, 2, dtype=torch.long), snap_share=0.5).select(v)


def test_snap_generates_on_smollm_with_the_papers_bytes(smollm):
    """Real SmolLM2, a 300-token needle prompt: the same kept bytes as the paper's razor, protected
    heads whole, sinks and recent tokens kept, and the chosen middle entries differ per head."""
    model, tok = smollm
    ids = torch.tensor([make_needle(tok, length=300, n_samples=1, seed=6)[0].input_ids])
    T, new = ids.shape[1], 4
    protected = torch.tensor([[14, 1], [18, 2], [17, 1], [23, 0]])
    caches = {}
    for share in (0.0, 0.5):
        policy = kv.Razor(budget=0.4, protected=protected, min_window=8, snap_share=share)
        out, cache = kv.generate(model, ids, policy, max_new_tokens=new, min_new_tokens=new)
        assert out.shape == (1, T + new)
        caches[share] = (policy, cache)
    (paper, c0), (snap, c1) = caches[0.0], caches[0.5]
    assert c1.kept_bytes() == c0.kept_bytes() < 0.5 * c1.full_bytes()
    _, window = snap.plan(T, len(c1.layers), model.config.num_key_value_heads)
    n_snap, recent = snap.split_window(window)
    assert n_snap > 0
    middles = set()
    for li, layer in enumerate(c1.layers):
        for g in layer.groups:
            pos = g.pos[:, : g.n]
            if g.n >= T:  # protected: every prompt token and the decoded ones
                assert (pos.sort(1).values == torch.arange(T + new - 1)).all()
                continue
            assert (pos[:, :4] == torch.arange(4)).all()
            for row in pos.tolist():
                real = [p for p in row if p >= 0]
                assert set(range(T - recent, T + new - 1)) <= set(real)
                middles.add(tuple(p for p in real if 4 <= p < T - recent))
    assert len(middles) > 1 and all(len(m) == n_snap for m in middles)


def test_layer_votes_choose_the_same_entries_for_every_compressed_head():
    T, H = 200, 3
    v = make_view(T, H, layer=0, n_layers=1, seed=2)
    scores = v.scores.clone()
    scores[2, 80] = 500.0  # the protected head looks at position 80: every compressed head keeps it
    v = PrefillView(0, 1, v.keys, v.values, scores)
    policy = Razor(budget=0.6, protected=torch.tensor([[0, 2]]), n_sink=4, snap_share=0.5, snap_votes="layer")
    got = by_head(policy.select(v))
    _, window = policy.plan(T, 1, H)
    n_snap, recent = policy.split_window(window)
    middle = [i for i in got[0][0] if 4 <= i < T - recent]
    assert middle == [i for i in got[1][0] if 4 <= i < T - recent] and 80 in middle and len(middle) == n_snap
    expect = pool_votes(scores[:, 4:T - recent].sum(0, keepdim=True), 5)[0].argsort(descending=True, stable=True)
    assert middle == sorted((expect[:n_snap] + 4).tolist())
    own = by_head(Razor(budget=0.6, protected=torch.tensor([[0, 2]]), n_sink=4, snap_share=0.5).select(v))
    assert own[0][0] != own[1][0]  # per-head votes differ on random scores
    with pytest.raises(ValueError, match="snap_votes"):
        Razor(budget=0.3, snap_votes="model")
