"""Observers vs their full-map references on random maps: hypothesis over shapes, padding, chunking.

Padded query rows carry NaN here: the contract lets them hold anything, and every statistic must
ignore them.
"""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from attnlab.analysis import (HeadStatsObserver, HiddenSinkObserver, InductionObserver, PrevTokenObserver,
                              SinkObserver, ThumbnailObserver, attention_sinks, head_stats, hidden_sinks,
                              induction_scores, pooled_map, prev_token_scores)
from attnlab.probes.replay import replay_maps

from diag_helpers import assert_close


def random_maps(n_layers, b, h, n, causal, kp, seed):
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.ones(b, n, n, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
    if kp is not None:
        allowed &= kp[:, None, :]
    maps = []
    for _ in range(n_layers):
        scores = torch.randn(b, h, n, n, generator=gen, dtype=torch.float64) * 3
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        p = scores.softmax(-1)
        if kp is not None:
            p = p.masked_fill(~kp[:, None, :, None], float("nan"))
        maps.append(p.float())
    return maps


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 20), b=st.integers(1, 3), h=st.integers(1, 3), causal=st.booleans(),
       pad=st.sampled_from(["none", "left", "right"]), chunk=st.integers(1, 9), seed=st.integers(0, 999),
       data=st.data())
def test_streaming_equals_reference(n, b, h, causal, pad, chunk, seed, data):
    kp = None
    if pad != "none":
        lengths = data.draw(st.lists(st.integers(1, n), min_size=b, max_size=b))
        idx = torch.arange(n)
        kp = torch.stack([(idx >= n - k) if pad == "left" else (idx < k) for k in lengths])
    maps = random_maps(2, b, h, n, causal, kp, seed)
    obs = [SinkObserver(top_k=2), HiddenSinkObserver(min_queries=1), HeadStatsObserver(), PrevTokenObserver(),
           ThumbnailObserver(4)]
    replay_maps(obs, maps, causal=causal, key_padding=kp, chunk=chunk)
    assert_close(obs[0].result(), attention_sinks(maps, causal=causal, key_padding=kp, top_k=2))
    assert_close(obs[1].result(), hidden_sinks(maps, causal=causal, key_padding=kp, min_queries=1))
    assert_close(obs[2].result(), head_stats(maps, causal=causal, key_padding=kp))
    assert_close(obs[3].result()["per_head"]["prev_token"], prev_token_scores(maps, key_padding=kp))
    for layer in range(2):
        assert torch.allclose(obs[4].maps(layer), pooled_map(maps[layer], 4, key_padding=kp), atol=1e-6)
    if n >= 4:
        period = data.draw(st.integers(2, n - 1))
        ind = InductionObserver(period, prefix=1)
        replay_maps([ind], maps, causal=causal, key_padding=kp, chunk=chunk)
        assert_close(ind.result()["per_head"], induction_scores(maps, period, 1, key_padding=kp))
