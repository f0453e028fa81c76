"""Pooled attention maps (report thumbnails) against max-pooling the full eager maps of a real model."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnlab.probes.replay import replay_maps
from attnlab.report.attention_maps import PooledAttentionMaps


def reference_pool(a: np.ndarray, size: int) -> np.ndarray:
    """(Nq, Nk) -> max over ceil(N/size) blocks, computed the slow obvious way."""
    n_q, n_k = a.shape
    bq, bk = math.ceil(n_q / size), math.ceil(n_k / size)
    out = np.zeros((math.ceil(n_q / bq), math.ceil(n_k / bk)))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = a[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].max()
    return out


@pytest.fixture(scope="module")
def eager_maps(smollm):
    model, tokenizer = smollm
    ids = tokenizer("In the beginning God created the heaven and the earth. " * 6, return_tensors="pt")["input_ids"]
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(ids[:, :67], output_attentions=True).attentions  # odd N: ragged last block
    finally:
        model.set_attn_implementation("sdpa")
    return attentions


@pytest.mark.parametrize("size,chunk", [(16, 7), (128, 64), (5, 67)])
def test_pooled_maps_equal_max_pool_of_full_maps(eager_maps, size, chunk):
    obs = PooledAttentionMaps(size=size)
    replay_maps([obs], eager_maps, causal=True, chunk=chunk)
    maps = obs.maps()
    assert len(maps) == len(eager_maps) * eager_maps[0].shape[1]
    for (layer, head), pooled in maps.items():
        ref = reference_pool(eager_maps[layer][0, head].double().numpy(), size)
        visible = np.isfinite(pooled)
        np.testing.assert_allclose(pooled[visible], ref[visible], atol=1e-6)
        # NaN exactly where no query of the row block may see any key of the column block.
        assert np.all(ref[~visible] == 0)
        assert np.all(np.diag(visible)) and (size >= 67 or not visible[0, -1])


def test_pooled_maps_keep_only_chosen_heads(eager_maps):
    obs = PooledAttentionMaps(size=8, heads={(0, 1), (3, 8)})
    replay_maps([obs], eager_maps, causal=True, chunk=32)
    assert sorted(obs.maps()) == [(0, 1), (3, 8)]
    ref = reference_pool(eager_maps[3][0, 8].double().numpy(), 8)
    got = obs.maps()[(3, 8)]
    np.testing.assert_allclose(got[np.isfinite(got)], ref[np.isfinite(got)], atol=1e-6)


def test_size_is_checked():
    with pytest.raises(ValueError, match="size"):
        PooledAttentionMaps(size=0)
