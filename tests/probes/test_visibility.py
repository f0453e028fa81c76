"""Visibility helpers: the analytic counts equal the brute-force mask; replay_maps argument errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnlab.probes.base import CallContext
from attnlab.probes.prefix import mass_before, row_cumsum
from attnlab.probes.replay import replay_maps
from attnlab.probes.visibility import (first_real_key, query_valid, visible_keys, visible_per_key,
                                       visible_per_query)


def brute(b, n_q, n_kv, causal, kp, q_start, c):
    pos = torch.arange(n_kv - n_q, n_kv)[q_start : q_start + c]
    vis = torch.zeros(b, c, n_kv, dtype=torch.bool)
    for s in range(b):
        for i, p in enumerate(pos.tolist()):
            if kp is not None and not kp[s, p]:
                continue
            for j in range(n_kv):
                vis[s, i, j] = (not causal or j <= p) and (kp is None or bool(kp[s, j]))
    return vis


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 3), n_kv=st.integers(1, 12), causal=st.booleans(), pad=st.booleans(),
       data=st.data())
def test_counts_match_brute_force(b, n_kv, causal, pad, data):
    n_q = data.draw(st.integers(1, n_kv))
    q_start = data.draw(st.integers(0, n_q - 1))
    c = data.draw(st.integers(1, n_q - q_start))
    kp = None
    if pad:
        kp = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=n_kv, max_size=n_kv),
                                             min_size=b, max_size=b)))
    ctx = CallContext(layer=0, n_layers=1, module=None, n_q=n_q, n_kv=n_kv,
                      q_positions=torch.arange(n_kv - n_q, n_kv), causal=causal, key_padding=kp)
    want = brute(b, n_q, n_kv, causal, kp, q_start, c)
    assert torch.equal(visible_keys(ctx, q_start, c, b), want)
    assert torch.equal(visible_per_key(ctx, q_start, c, b), want.sum(1).double())
    assert torch.equal(visible_per_query(ctx, q_start, c, b), want.sum(2))
    pos = torch.arange(n_kv - n_q, n_kv)[q_start : q_start + c]
    real = torch.ones(b, c, dtype=torch.bool) if kp is None else kp[:, pos]
    assert torch.equal(query_valid(ctx, q_start, c, b), real)


def test_first_real_key():
    kp = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    assert first_real_key(kp, 2).tolist() == [2, 0]
    assert first_real_key(None, 3).tolist() == [0, 0, 0]


def test_mass_before_is_prefix_sum():
    p = torch.rand(2, 3, 5, 7)
    idx = torch.randint(0, 8, (5, 4))
    got = mass_before(row_cumsum(p), idx)
    want = torch.stack([torch.stack([p[..., i, : int(k)].sum(-1) for k in idx[i]], -1) for i in range(5)], -2)
    assert torch.allclose(got, want, atol=1e-6)
    p.add_(1.0)  # an in-place change invalidates the cached prefix sum
    assert torch.allclose(row_cumsum(p), p.cumsum(-1))


def test_replay_maps_errors():
    with pytest.raises(ValueError, match="chunk"):
        replay_maps([], [torch.rand(1, 1, 2, 2)], causal=True, chunk=0)
    with pytest.raises(ValueError, match="attentions"):
        replay_maps([], [], causal=True)
    with pytest.raises(ValueError, match="key_padding"):
        replay_maps([], [torch.rand(1, 1, 2, 2)], causal=True, key_padding=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, H, Nq, Nk\)"):
        replay_maps([], [torch.rand(2, 2)], causal=True)
