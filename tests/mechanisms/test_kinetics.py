"""Kinetics block top-k attention vs a float64 dense masked softmax with the same blocks; its cost model vs a step sum."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab import reference
from attnlab.mechanisms import MECHANISMS
from attnlab.mechanisms.kinetics import E_MEMORY, KineticsAttention, block_topk_attention, decode_cost


def _selection(q, k, block, topk, sinks, window, causal):
    """Re-statement, query by query: group- and block-averaged logits over visible keys, top-k blocks + sinks + window."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    mask = torch.zeros(b, hq, nq, nk, dtype=torch.bool)
    for bi in range(b):
        for h in range(hkv):
            for i in range(nq):
                pos = i + nk - nq
                vis = [j for j in range(nk) if not causal or j <= pos]
                logit = sum(q[bi, h * g + x, i] @ k[bi, h].T for x in range(g)) / g / math.sqrt(d)
                score = {}
                for blk in range(-(-nk // block)):
                    keys = [j for j in range(blk * block, min(nk, (blk + 1) * block)) if j in vis]
                    if keys:
                        score[blk] = logit[keys].mean().item()
                best = sorted(score, key=lambda x: -score[x])[:topk]
                for j in vis:
                    near = 0 <= pos - j < window if causal else abs(pos - j) < window
                    if j // block in best or j < sinks or near:
                        mask[bi, h * g : (h + 1) * g, i, j] = True
    return mask


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), g=st.integers(1, 2), nq=st.integers(1, 6), extra=st.integers(0, 6),
       d=st.integers(1, 4), block=st.integers(1, 4), sinks=st.integers(0, 2), window=st.integers(0, 3),
       causal=st.booleans(), data=st.data(), seed=st.integers(0, 2**16))
def test_matches_dense_masked_float64_with_same_blocks(b, hkv, g, nq, extra, d, block, sinks, window, causal, data, seed):
    nk = nq + extra
    topk = data.draw(st.integers(1, -(-nk // block)))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * g, nq, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(b, hkv, nk, d, generator=gen, dtype=torch.float64) for _ in range(2))
    out, mask = block_topk_attention(q, k, v, block=block, topk=topk, sinks=sinks, window=window, causal=causal)
    assert torch.equal(mask, _selection(q, k, block, topk, sinks, window, causal))
    torch.testing.assert_close(out, reference.attention(q, k, v, mask=mask))  # GQA through the reference


def test_prefill_rows_equal_one_token_decoding_steps():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 20, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 20, 8, generator=g, dtype=torch.float64) for _ in range(2))
    full, _ = block_topk_attention(q, k, v, block=4, topk=2, sinks=2, window=3)
    for t in range(20):  # the cache grows by one token per step; the last block is partial most of the time
        step, mask = block_topk_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], block=4,
                                          topk=min(2, t // 4 + 1), sinks=2, window=3)
        torch.testing.assert_close(step[:, :, 0], full[:, :, t])
        assert mask.sum(-1).max() <= min(t + 1, 2 + 3 + 2 * 4)


def test_cost_model_equals_step_by_step_sum():
    p, l_ctx, l_gen, trials = 1e8, 3000, 700, 3
    shape = dict(n_layers=4, h_q=8, h_kv=2, head_dim=64)
    per, per_kv = 8 * 64 * 4, 2 * 64 * 4
    ts = range(l_gen)
    dense = decode_cost(p, l_ctx, l_gen, trials=trials, **shape)
    want_c = trials * sum(2 * p + 4 * (l_ctx + t) * per for t in ts)
    want_m = sum(4 * (l_ctx + trials * t) * per_kv for t in ts)  # 2 bytes x (K, V); shared context read once
    assert dense["compute"] == pytest.approx(want_c, rel=1e-3) and dense["memory"] == pytest.approx(want_m, rel=1e-3)
    assert dense["eflops"] == dense["compute"] + E_MEMORY * dense["memory"]
    for budget_blocks in (10, 300):  # budget below and above the context length
        sp = decode_cost(p, l_ctx, l_gen, trials=trials, block=16, topk=budget_blocks, local=64, **shape)
        b = 64 + 16 * budget_blocks
        kv = sum(min(b, l_ctx + t) for t in ts)
        search = sum(2 * (l_ctx + t) / 16 for t in ts)
        assert sp["compute"] == pytest.approx(trials * (2 * p * l_gen + 4 * kv * per + search * per), rel=1e-3)
        assert sp["memory"] == pytest.approx(trials * (4 * kv * per_kv + search * per_kv), rel=1e-3)
    small = decode_cost(p, 32768, 4096, block=16, topk=32, local=64, **shape)["eflops"]
    assert small < decode_cost(p, 32768, 4096, **shape)["eflops"] / 5  # long context: memory dominates, sparsity pays


def test_module_causal_gqa_gradients_registry():
    assert MECHANISMS["kinetics"] is KineticsAttention
    torch.manual_seed(0)
    m = KineticsAttention(16, 4, n_kv_heads=2, block=2, topk=2, sinks=1, window=2).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone()
    x2[:, 7:] = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x2)[:, :7], m(x)[:, :7])
    assert not torch.allclose(m(x2)[:, 7:], m(x)[:, 7:])
    m(x).square().sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad.abs().sum() > 0 for p in m.parameters())
    assert m(torch.randn(1, 1, 16, dtype=torch.float64)).shape == (1, 1, 16)


def test_clear_errors():
    q = torch.randn(1, 2, 1, 4)
    k = torch.randn(1, 1, 9, 4)
    with pytest.raises(ValueError, match="topk"):
        block_topk_attention(q, k, k, block=4, topk=4)
    with pytest.raises(ValueError, match="block"):
        block_topk_attention(q, k, k, block=0, topk=1)
    with pytest.raises(ValueError, match="n_kv_heads"):
        KineticsAttention(16, 4, n_kv_heads=3)
    with pytest.raises(ValueError, match="block"):
        decode_cost(1e6, 100, 10, n_layers=1, h_q=1, h_kv=1, head_dim=8, block=16)
    with pytest.raises(ValueError, match="l_gen"):
        decode_cost(1e6, 100, 0, n_layers=1, h_q=1, h_kv=1, head_dim=8)
