"""Compiled FlexAttention through attnlab: few and small, since each compile costs seconds on CPU."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from attnlab import reference
from attnlab.core.patterns import causal, neighborhood, sliding_window
from attnlab.kernels import attention
from attnlab.kernels import flex as flex_mod
from kernel_helpers import random_qkv


def test_flex_window_gqa_cross_and_no_recompile():
    q, k, v = random_qkv(2, 4, 2, 150, 200, 16, 16)
    out = attention(q, k, v, pattern=sliding_window(33), kernel="flex")
    ref = reference.attention(q, k, v, pattern=sliding_window(33))
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    graphs = counters["stats"]["unique_graphs"]
    # A new but equal pattern object must reuse the compiled kernel and the cached BlockMask.
    again = attention(q, k, v, pattern=sliding_window(33), kernel="flex")
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(again, out)
    info = flex_mod.block_mask.cache_info()
    assert info.hits >= 1


def test_compiled_flex_allows_many_patterns():
    import torch._dynamo.config as dynamo_config

    flex_mod.compiled_flex()
    # Past the recompile limit flex_attention runs unfused (full score matrix): one kernel per pattern.
    assert dynamo_config.recompile_limit >= flex_mod.RECOMPILE_LIMIT


def test_flex_score_mod_alibi_causal():
    def alibi(score, b, h, q_idx, kv_idx):
        return score - (h + 1) * 0.25 * (q_idx - kv_idx)

    q, k, v = random_qkv(1, 2, 1, 130, 130, 16, 8)
    out = attention(q, k, v, pattern=causal(), score_mod=alibi, kernel="flex")
    ref = reference.attention(q, k, v, pattern=causal(), score_mod=alibi)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_flex_2d_neighborhood_runs_in_tile_order(monkeypatch):
    # At this toy size row-major order is sparser, so force the tile order to test permute/restore.
    monkeypatch.setattr(flex_mod, "token_order", lambda p, n_q, n_kv, device, block=128: p.token_order(n_q, n_kv))
    p = neighborhood((16, 32), (5, 7), tile_shape=(8, 16))
    q, k, v = random_qkv(1, 2, 2, 512, 512, 16, 16)
    def rel_bias(score, b, h, q_idx, kv_idx):  # must see grid positions, not tile-order positions
        return score + 0.01 * (q_idx - kv_idx)

    out = attention(q, k, v, pattern=p, score_mod=rel_bias, kernel="flex")
    ref = reference.attention(q, k, v, pattern=p, score_mod=rel_bias)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_flex_picks_the_sparser_token_order():
    wide = neighborhood((128, 128), 33)  # tiles touch 11.7% of blocks, row-major order 25.8%
    assert flex_mod.token_order(wide, 16384, 16384, torch.device("cpu")) is not None
    narrow = neighborhood((64, 64), 9)  # row-major 2-row blocks beat 8 x 16 tiles here
    assert flex_mod.token_order(narrow, 4096, 4096, torch.device("cpu")) is None


@pytest.mark.slow
def test_flex_fully_masked_rows_and_half():
    q, k, v = random_qkv(1, 2, 2, 90, 60, 16, 16, dtype=torch.bfloat16)
    out = attention(q, k, v, pattern=causal(), kernel="flex")
    assert (out[:, :, :30] == 0).all() and not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), reference.attention(q, k, v, pattern=causal()), atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_all_paths(dtype):
    q, k, v = (t.cuda() for t in random_qkv(1, 4, 2, 300, 300, 64, 64, dtype=dtype))
    for pattern in (None, causal(), sliding_window(65), neighborhood((15, 20), 5)):
        ref = reference.attention(q, k, v, pattern=pattern)
        for kernel in ("auto", "sdpa", "flex", "chunked"):
            out = attention(q, k, v, pattern=pattern, kernel=kernel)
            tol = {torch.float32: 1e-3, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
            torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
