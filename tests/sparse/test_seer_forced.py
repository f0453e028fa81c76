"""SeerAttention with forced sink / local blocks, the oracle's pooling modes, and finer blocks (16, 32).

CPU tests check the selections, the pooled oracle against a float64 map, the KL with forced blocks left
out, and (on SmolLM2) that forcing as many blocks as k reproduces the sink + window selection. GPU tests
run block-sparse prefill at 16- and 32-token blocks on the Triton kernel against the float64 reference.
"""
from __future__ import annotations

from importlib import resources

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnlab import reference
from attnlab.hf.attach import attach
from attnlab.probes.base import CallContext
from attnlab.sparse.seer import AttnGate, gate_kl, make_gates, mean_kl, pool_qk, calibration_data, train_gates
from attnlab.sparse.seer_prefill import (
    BlockSelect, forced_blocks, oracle_pooled, select_sink_window, select_topk, topk_density,
)


def _dense_probs(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """(B, Hq, N, N) float64 causal softmax, GQA keys repeated."""
    k = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (q.double() @ k.transpose(-1, -2)) * scaling
    n = q.shape[2]
    return s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)


@settings(max_examples=25, deadline=None)
@given(qb=st.integers(1, 12), k=st.integers(1, 8), sink=st.booleans(), local=st.integers(1, 4), seed=st.integers(0, 999))
def test_forced_blocks_are_kept_and_counted_in_k(qb, k, sink, local, seed):
    forced = forced_blocks(qb, sink, local)
    causal = torch.ones(qb, qb, dtype=torch.bool).tril()
    assert not (forced & ~causal).any() and forced.diagonal().all()
    assert forced[:, 0].all() if sink else True
    k = max(k, local + sink)
    scores = torch.randn(2, 3, qb, qb, generator=torch.Generator().manual_seed(seed))
    sel = select_topk(scores, k, forced)
    assert (sel | ~forced).all()  # every forced block is in
    assert not (sel & ~causal).any()
    assert (sel.sum(-1) == torch.arange(1, qb + 1).clamp(max=k)).all()  # k blocks per row, forced included
    # the free blocks are the best-scored ones
    free = sel & ~forced
    s = scores.masked_fill(~causal, float("-inf"))
    worst_in = torch.where(free, s, torch.full_like(s, float("inf"))).amin(-1)
    best_out = torch.where(causal & ~sel, s, torch.full_like(s, float("-inf"))).amax(-1)
    assert (worst_in >= best_out).all()


@pytest.mark.parametrize("block,rows,hq,hkv", [(4, 4, 6, 2), (8, 24, 3, 3), (16, 1000, 4, 1)])
def test_oracle_pooled_equals_float64_pooled_map(block, rows, hq, hkv):
    g = torch.Generator().manual_seed(block)
    n = 48
    q, k = torch.randn(1, hq, n, 16, generator=g), torch.randn(1, hkv, n, 16, generator=g)
    p = _dense_probs(q, k, 0.25).view(1, hkv, hq // hkv, n // block, block, n // block, block)
    for reduce, ref in (("max", p.amax((2, 4, 6))), ("mass", p.sum((2, 4, 6)))):
        got = oracle_pooled(q, k, 0.25, block, reduce, rows=rows)
        assert got.shape == (1, hkv, n // block, n // block)
        assert (got.double() - ref).abs().max().item() < 1e-5, reduce
    with pytest.raises(ValueError, match="reduce"):
        oracle_pooled(q, k, 0.25, block, "sum")


def test_gate_kl_leaves_forced_blocks_out():
    g = torch.Generator().manual_seed(0)
    qb = 6
    causal = torch.ones(qb, qb, dtype=torch.bool).tril()
    logits = torch.randn(2, 3, qb, qb, generator=g).masked_fill(~causal, float("-inf")).requires_grad_()
    target = torch.rand(2, 3, qb, qb, generator=g) * causal
    target = target / target.sum(-1, keepdim=True)
    ex = forced_blocks(qb, True, 2)
    kl = gate_kl(logits.log_softmax(-1), target, ex)
    kl.backward()
    assert torch.isfinite(logits.grad).all()
    free = causal & ~ex
    ref = []
    for i in range(qb):
        cols = free[i].nonzero().flatten()
        if len(cols) == 0:
            ref.append(torch.zeros(2, 3))
            continue
        t = target[..., i, cols] / target[..., i, cols].sum(-1, keepdim=True)
        lg = logits[..., i, cols].detach().log_softmax(-1)
        ref.append((t * (t.log() - lg)).sum(-1))
    assert torch.allclose(kl, torch.stack(ref, -1).mean(), atol=1e-6)
    # a gate that moves mass only among forced blocks does not change the loss
    shifted = logits.detach().clone()
    shifted[..., 0] += 5.0
    assert torch.allclose(gate_kl(shifted.log_softmax(-1), target, ex), kl.detach(), atol=1e-5)


def test_clear_errors_for_forcing():
    with pytest.raises(ValueError, match="keep_local"):
        forced_blocks(4, False, 0)
    with pytest.raises(ValueError, match="k=2"):
        BlockSelect("oracle_topk", k=2, keep_sink=True, keep_local=2)
    with pytest.raises(ValueError, match="oracle_reduce"):
        BlockSelect("oracle_topk", k=3, oracle_reduce="sum")
    with pytest.raises(ValueError, match="keep_local"):
        BlockSelect("window", k=3, keep_local=0)


@pytest.fixture(scope="module")
def ids(smollm):
    text = resources.files("attnlab.data").joinpath("kjv_genesis.txt").read_text()
    return smollm[1](text, return_tensors="pt").input_ids[:, :128]


def test_forcing_k_blocks_is_the_sink_window_on_smollm(smollm, ids, block=16):
    """With k = 1 sink + (k - 1) local blocks forced, any score gives sink + window: same logits."""
    model, _ = smollm
    gates = make_gates(model, hidden=8)
    out = {}
    with torch.no_grad():
        for name, mod in (("sink_window", BlockSelect("sink_window", block=block, k=3)),
                          ("oracle", BlockSelect("oracle_topk", block=block, k=3, keep_sink=True, keep_local=2,
                                                 oracle_reduce="mass")),
                          ("seer", BlockSelect("seer_topk", block=block, k=3, gates=gates, keep_sink=True,
                                               keep_local=2))):
            with attach(model, modifiers=[mod]):
                out[name] = model(input_ids=ids).logits
            assert abs(mod.mean_density() - topk_density(128 // block, 3)) < 1e-9
    assert torch.equal(out["oracle"], out["sink_window"]) and torch.equal(out["seer"], out["sink_window"])


def test_training_with_forced_blocks_reduces_the_free_block_kl(smollm, ids):
    model, _ = smollm
    full = calibration_data(model, ids[:, :128], block=16)
    data = [{i: full[i] for i in (2, 17)}]
    ex = forced_blocks(8, True, 2)
    gates = make_gates(model, hidden=16)
    before = mean_kl(gates, data, ex)
    train_gates(gates, data, steps=20, lr=1e-2, exclude=ex)
    assert mean_kl(gates, data, ex) < 0.8 * before


DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton block-sparse kernel)")
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("method", ["oracle_topk", "seer_topk", "sink_window"])
def test_block_sparse_prefill_at_fine_blocks_on_the_kernel(block, method):
    """BlockSelect.attend at 16- and 32-token blocks (cells cut the kernel's 64 x 64 tiles) equals the
    float64 reference under the selection it simulates, with sink and local blocks forced."""
    g = torch.Generator().manual_seed(block)
    n, hq, hkv, d = 320, 6, 2, 64
    q = torch.randn(1, hq, n, d, generator=g).to(DEV, torch.bfloat16)
    key, v = (torch.randn(1, hkv, n, d, generator=g).to(DEV, torch.bfloat16) for _ in range(2))
    gates = {"0": AttnGate(hkv, d, 16, group=hq // hkv).to(DEV)}
    ctx = CallContext(layer=0, n_layers=1, module=torch.nn.Identity(), n_q=n, n_kv=n,
                      q_positions=torch.arange(n, device=DEV), causal=True, key_padding=None, scaling=d ** -0.5,
                      extra={}, input_ids=None)
    kw = {} if method == "sink_window" else {"keep_sink": True, "keep_local": 2, "gates": gates}
    mod = BlockSelect(method, block=block, k=5, **kw)
    out = mod.attend(ctx, q, key, v)
    sel = mod.selection(ctx, q, key).cpu()
    i = torch.arange(n)
    mask = sel[:, :, i // block][:, :, :, i // block].repeat_interleave(hq // hkv, dim=1) & (i[None, :] <= i[:, None])
    ref = reference.attention(q, key, v, mask=mask.to(DEV))
    assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-2
    assert sel[..., 1:, 0].all()  # the sink block is kept in every row (k > 1)


def test_calibration_targets_max_and_mass_from_one_pass(smollm, ids):
    """The "mass" target is each tile's probability mass (mean over the block's query rows), summed over the
    GQA group and normalised over causal blocks, from the eager attention map; "max" is calibration_data's."""
    from attnlab.sparse.seer import calibration_targets

    model, _ = smollm
    x = ids[:, :64]
    both = calibration_targets(model, x, block=16, targets=("max", "mass"))
    single = calibration_data(model, x, block=16)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = model(input_ids=x, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    for layer in (0, 29):
        for j in range(3):
            assert torch.equal(both["max"][layer][j], single[layer][j])
        assert torch.equal(both["mass"][layer][0], single[layer][0])
        tiles = eager[layer].double().view(1, 3, 3, 4, 16, 4, 16).sum(6).mean(4).sum(2)  # (1, Hkv, Qb, Kb)
        ref = tiles / tiles.sum(-1, keepdim=True)
        assert (both["mass"][layer][2].double() - ref).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="targets"):
        calibration_targets(model, x, block=16, targets=("sum",))


@settings(max_examples=25, deadline=None)
@given(qb=st.integers(1, 13), block=st.sampled_from([8, 16, 32, 64, 128]), seed=st.integers(0, 999))
def test_tile_density_counts_the_kernel_tiles_a_selection_touches(qb, block, seed):
    from attnlab.sparse.seer_prefill import tile_density

    g = torch.Generator().manual_seed(seed)
    sel = (torch.rand(2, 3, qb, qb, generator=g) < 0.3) & torch.ones(qb, qb, dtype=torch.bool).tril()
    n = qb * block
    i = torch.arange(n)
    tok = sel[:, :, i // block][:, :, :, i // block]  # token-level mask
    nt = -(-n // 64) if block < 64 else qb
    t = block if block >= 64 else 64
    touched = sum(tok[:, :, a * t:(a + 1) * t, c * t:(c + 1) * t].flatten(2).any(-1).sum().item()
                  for a in range(nt) for c in range(a + 1))
    assert abs(tile_density(sel, block, 64) - touched / (nt * (nt + 1) // 2 * 6)) < 1e-9
