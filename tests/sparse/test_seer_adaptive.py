"""Adaptive block budgets (seer_adaptive): top-p per row, top-p at top-k's budget, global budget per layer.

Selections are checked for causality, forced blocks and exact block counts on random probabilities
(hypothesis), against brute-force statements of their definitions, through BlockSelect on SmolLM2 (oracle and
gates), and on the Triton kernel (GPU) with a layout whose rows keep different numbers of blocks.
"""
from __future__ import annotations

from importlib import resources

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnlab import reference
from attnlab.hf.attach import attach
from attnlab.probes.base import CallContext
from attnlab.sparse.seer import AttnGate, make_gates
from attnlab.sparse.seer_adaptive import (
    allocate_head_k, free_distribution, kept_mass_curve, mass_before, select_budget, select_head_topk, select_topp,
    topk_count, topp_priority,
)
from attnlab.sparse.seer_prefill import BlockSelect, forced_blocks, select_topk, topk_density

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _probs(b, h, qb, seed, peaked=False):
    """(B, H, Qb, Kb) causal row distributions, some rows peaked, some flat (so allocations differ)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, h, qb, qb, generator=g) * (4.0 if peaked else 1.0)
    s = s.masked_fill(~torch.ones(qb, qb, dtype=torch.bool).tril(), float("-inf"))
    return s.softmax(-1)


def _free(qb, forced):
    return torch.ones(qb, qb, dtype=torch.bool).tril() & ~(forced | torch.eye(qb, dtype=torch.bool))


@settings(max_examples=20, deadline=None)
@given(qb=st.integers(1, 14), h=st.integers(1, 3), k=st.integers(1, 9), sink=st.booleans(), local=st.integers(1, 3),
       seed=st.integers(0, 999), topp=st.booleans(), renorm=st.booleans())
def test_budget_selection_is_causal_keeps_forced_and_spends_exactly_topk_count(qb, h, k, sink, local, seed, topp,
                                                                                renorm):
    k = max(k, local + sink)
    forced = forced_blocks(qb, sink, local)
    probs = _probs(2, h, qb, seed, peaked=seed % 2 == 0)
    prio = topp_priority(probs, forced, renorm) if topp else free_distribution(probs, forced, renorm)
    sel = select_budget(prio, k, forced)
    causal = torch.ones(qb, qb, dtype=torch.bool).tril()
    assert not (sel & ~causal).any()
    assert (sel | ~forced).all() and sel.diagonal(dim1=-2, dim2=-1).all()
    # density accounting: per sequence exactly uniform top-k's block count, hence its density
    assert (sel.sum((1, 2, 3)) == h * topk_count(qb, k)).all()
    assert sel.sum().item() / (2 * h * qb * (qb + 1) / 2) == pytest.approx(topk_density(qb, k), abs=1e-12)
    free = _free(qb, forced)
    kept, dropped = sel & free, ~sel & free
    if kept.any() and dropped.any():
        fd = free_distribution(probs, forced, renorm)
        if topp:  # one p per sequence: every kept block had less mass ranked above it than any dropped one
            mb = mass_before(fd) + (0 if renorm else 1 - fd.sum(-1, keepdim=True))  # (+ the forced share)
            for b in range(2):
                assert mb[b][kept[b]].max() <= mb[b][dropped[b]].min() + 1e-6
        else:  # global: the largest (renormalised or true) probabilities of the sequence, whatever their row
            for b in range(2):
                assert fd[b][kept[b]].min() >= fd[b][dropped[b]].max() - 1e-7


@settings(max_examples=15, deadline=None)
@given(qb=st.integers(1, 14), p=st.floats(0.05, 0.95), sink=st.booleans(), local=st.integers(1, 3),
       seed=st.integers(0, 999), renorm=st.booleans())
def test_topp_keeps_the_smallest_prefix_reaching_p_in_every_row(qb, p, sink, local, seed, renorm):
    forced = forced_blocks(qb, sink, local)
    probs = _probs(1, 2, qb, seed, peaked=seed % 2 == 1)
    sel = select_topp(probs, p, forced, renorm)
    causal = torch.ones(qb, qb, dtype=torch.bool).tril()
    assert not (sel & ~causal).any() and (sel | ~forced).all() and sel.diagonal(dim1=-2, dim2=-1).all()
    free = _free(qb, forced)
    fd = free_distribution(probs, forced, renorm).double()
    for h in range(2):
        for i in range(qb):
            if not free[i].any():
                assert (sel[0, h, i] == (forced[i] | (torch.arange(qb) == i))).all()
                continue
            # brute force: sort the free blocks, keep until the mass reaches p
            order = sorted(free[i].nonzero().flatten().tolist(), key=lambda j: (-fd[0, h, i, j].item(), j))
            # renorm=False: the forced blocks' true share is in the set already
            want, acc = set(), 0.0 if renorm else 1 - fd[0, h, i].sum().item()
            for j in order:
                if acc >= p - 1e-6:
                    break
                want.add(j)
                acc += fd[0, h, i, j].item()
            got = set((sel[0, h, i] & free[i]).nonzero().flatten().tolist())
            assert got == want or abs(acc - p) < 1e-5  # float ties at exactly p may go either way


def test_mass_before_and_free_distribution_small_example():
    probs = torch.tensor([[[[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.3, 0.5, 0], [0.1, 0.6, 0.1, 0.2]]]])
    fd = free_distribution(probs)  # only the diagonal is kept: free = strictly below it
    assert torch.allclose(fd[0, 0, 3], torch.tensor([0.125, 0.75, 0.125, 0.0]))
    assert fd[0, 0, 0].sum() == 0 and torch.allclose(fd[0, 0, 1], torch.tensor([1.0, 0, 0, 0]))
    assert torch.allclose(mass_before(fd)[0, 0, 3, :3], torch.tensor([0.75, 0.0, 0.875]))
    sel = select_topp(probs, 0.8)  # row 3 needs blocks 1 and 0 (0.75 < 0.8), not block 2
    assert sel[0, 0, 3].tolist() == [True, True, False, True]


@settings(max_examples=20, deadline=None)
@given(qb=st.integers(1, 12), sink=st.booleans(), local=st.integers(1, 3), seed=st.integers(0, 999),
       ks=st.lists(st.integers(1, 12), min_size=3, max_size=3))
def test_head_topk_is_topk_per_head_and_curve_is_its_kept_mass(qb, sink, local, seed, ks):
    forced = forced_blocks(qb, sink, local)
    ks = [max(k, local + sink) for k in ks]
    probs = _probs(2, 3, qb, seed, peaked=seed % 2 == 0)
    sel = select_head_topk(probs, ks, forced)
    curve = kept_mass_curve(probs, forced)
    other = torch.randn(probs.shape, generator=torch.Generator().manual_seed(seed + 1))  # e.g. a gate's scores
    by_other = kept_mass_curve(probs, forced, scores=other)
    for h, k in enumerate(ks):
        want = select_topk(probs[:, h:h + 1], k, forced)
        assert torch.equal(sel[:, h:h + 1], want)
        assert curve[h, min(k, qb)].item() == pytest.approx((probs[:, h] * want[:, 0]).sum(-1).mean().item(), abs=1e-5)
        # ranked by other scores: the share that THEIR top-k keeps, never more than the oracle's
        theirs = select_topk(other[:, h:h + 1], k, forced)
        assert by_other[h, min(k, qb)].item() == pytest.approx((probs[:, h] * theirs[:, 0]).sum(-1).mean().item(),
                                                               abs=1e-5)
        assert by_other[h, min(k, qb)] <= curve[h, min(k, qb)] + 1e-6
    assert not (sel & ~torch.ones(qb, qb, dtype=torch.bool).tril()).any()


def test_allocate_head_k_spends_at_most_topk_count_and_follows_need():
    g = torch.Generator().manual_seed(0)
    qb, forced = 32, forced_blocks(32, True, 2)
    s = torch.randn(1, 3, qb, qb, generator=g)
    s[:, 0] *= 8  # head 0 peaked, head 2 flat
    s[:, 2] *= 0.1
    probs = s.masked_fill(~torch.ones(qb, qb, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    c = kept_mass_curve(probs, forced)
    same = allocate_head_k({0: c[:1].repeat(3, 1), 1: c[:1].repeat(3, 1)}, qb, 6, k_min=3)
    assert same == {0: [6, 6, 6], 1: [6, 6, 6]}  # equal needs: uniform k
    for k in (3, 5, 9):
        alloc = allocate_head_k({0: c, 1: c.flip(0)}, qb, k, k_min=3)
        ks = alloc[0] + alloc[1]
        used, budget = sum(topk_count(qb, x) for x in ks), 6 * topk_count(qb, k)
        assert used <= budget and all(x >= 3 for x in ks)
        assert budget - used < qb - min(ks) or max(ks) == qb  # no further step of the cheapest head fits
        # the allocation keeps at least the attention share that one k everywhere keeps (a feasible choice)
        kept = sum(c[h, x] for h, x in enumerate(alloc[0])) + sum(c.flip(0)[h, x] for h, x in enumerate(alloc[1]))
        assert kept >= 2 * c[:, k].sum() - 1e-6
        assert k == 3 or alloc[0] != [k] * 3  # above the forced minimum, peaked and flat heads get different k


def test_clear_errors():
    probs = _probs(1, 1, 4, 0)
    for p in (0, 1, 1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="p="):
            select_topp(probs, p)
    with pytest.raises(ValueError, match="k="):
        select_budget(probs, 0)
    with pytest.raises(ValueError, match="forced per row"):
        select_budget(probs, 2, forced_blocks(4, True, 2))
    gates = {"0": None}
    with pytest.raises(ValueError, match="exactly one of k"):
        BlockSelect("oracle_topp", block=16)
    with pytest.raises(ValueError, match="exactly one of k"):
        BlockSelect("oracle_topp", block=16, k=4, p=0.9)
    with pytest.raises(ValueError, match="p="):
        BlockSelect("oracle_topp", block=16, p=1.2)
    with pytest.raises(ValueError, match="p is for the top-p"):
        BlockSelect("oracle_topk", block=16, k=4, p=0.9)
    with pytest.raises(ValueError, match="k="):
        BlockSelect("oracle_global", block=16)
    with pytest.raises(ValueError, match="forced blocks"):
        BlockSelect("oracle_global", block=16, k=2, keep_sink=True, keep_local=2)
    with pytest.raises(ValueError, match="needs trained gates"):
        BlockSelect("seer_topp", block=16, k=4)
    with pytest.raises(ValueError, match="renorm=False"):
        BlockSelect("seer_topp", block=16, k=4, gates=gates, renorm=False)
    with pytest.raises(ValueError, match="renorm"):
        BlockSelect("oracle_topp", block=16, k=4, renorm=0)
    with pytest.raises(ValueError, match="needs head_k"):
        BlockSelect("oracle_headk", block=16)
    with pytest.raises(ValueError, match="forced blocks per row"):
        BlockSelect("oracle_headk", block=16, head_k={0: [3, 2]}, keep_sink=True, keep_local=2)
    with pytest.raises(ValueError, match="head_k is for"):
        BlockSelect("oracle_topk", block=16, k=3, head_k={0: [3]})
    with pytest.raises(ValueError, match="one positive int per head"):
        select_head_topk(probs, [2, 2])
    with pytest.raises(ValueError, match="k="):
        allocate_head_k({0: torch.zeros(1, 5)}, 4, 5)
    BlockSelect("seer_global", block=16, k=4, gates=gates)  # valid
    BlockSelect("oracle_global", block=16, k=4, renorm=False)


@pytest.fixture(scope="module")
def ids(smollm):
    text = resources.files("attnlab.data").joinpath("kjv_genesis.txt").read_text()
    return smollm[1](text, return_tensors="pt").input_ids[:, :128]


def test_adaptive_blockselect_on_smollm_exact_density_and_causal(smollm, ids):
    """Oracle and (untrained) gates through attach on SmolLM2: the budgeted methods keep exactly top-k's density
    in every layer, rows differ in how many blocks they keep, and perplexity stays finite; fixed p reports
    the density it reached; per-head k keeps its k in every row; at equal density the oracle's allocation
    loses less than a sliding window."""
    model, _ = smollm
    qb, k = 128 // 16, 4
    gates = make_gates(model, hidden=16)
    seen, nll = {}, {}

    class Spy(BlockSelect):
        def selection(self, ctx, query, key):
            sel = super().selection(ctx, query, key)
            seen.setdefault(self.method, []).append(sel)
            return sel

    head_k = {layer: [3, 4, 5] for layer in range(model.config.num_hidden_layers)}
    for method, kw in [("oracle_topp", {"k": k, "oracle_reduce": "mass", "renorm": False}),
                       ("seer_global", {"k": k, "gates": gates}), ("oracle_topp", {"p": 0.5, "oracle_reduce": "mass"}),
                       ("seer_headk", {"head_k": head_k, "gates": gates})]:
        mod = Spy(method, block=16, keep_sink=True, keep_local=2, **kw)
        with torch.no_grad(), attach(model, modifiers=[mod]):
            logits = model(input_ids=ids).logits
        assert torch.isfinite(logits).all()
        nll.setdefault(method, torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item())
        sels = seen.pop(method)
        assert len(sels) == model.config.num_hidden_layers
        causal = torch.ones(qb, qb, dtype=torch.bool).tril()
        for sel in sels:
            assert not (sel & ~causal).any() and sel[..., 1:, 0].all() and sel.diagonal(dim1=-2, dim2=-1).all()
        if "k" in kw:
            assert all(d == pytest.approx(topk_density(qb, k), abs=1e-12) for d in mod.density.values())
            counts = torch.stack(sels).sum(-1)[..., k:]  # rows with more than k causal blocks
            assert counts.min() < k < counts.max()  # the budget moved between rows
        elif "head_k" in kw:
            want = sum(topk_density(qb, x) for x in (3, 4, 5)) / 3
            assert all(d == pytest.approx(want, abs=1e-12) for d in mod.density.values())
            assert all((s.sum(-1)[0, h, 5:] == 3 + h).all() for s in sels for h in range(3))
        else:
            assert 0 < mod.mean_density() < 1
            assert mod.mean_density() == pytest.approx(
                sum(s.sum().item() / (s.shape[1] * qb * (qb + 1) / 2) for s in sels) / len(sels))
    with torch.no_grad(), attach(model, modifiers=[BlockSelect("window", block=16, k=k)]):
        logits = model(input_ids=ids).logits
    assert nll["oracle_topp"] < torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton block-sparse kernel)")
@pytest.mark.parametrize("method", ["oracle_topp", "oracle_global", "seer_topp"])
def test_variable_blocks_per_row_on_the_kernel(method):
    """BlockSelect.attend with a per-row variable block count (adaptive budgets) on the Triton block-sparse
    kernel equals the float64 reference under the same selection."""
    g = torch.Generator().manual_seed(3)
    n, hq, hkv, d, block = 320, 6, 2, 64, 16
    q = torch.randn(1, hq, n, d, generator=g).to(DEV, torch.bfloat16)
    key, v = (torch.randn(1, hkv, n, d, generator=g).to(DEV, torch.bfloat16) for _ in range(2))
    gates = {"0": AttnGate(hkv, d, 16, group=hq // hkv).to(DEV)}
    ctx = CallContext(layer=0, n_layers=1, module=torch.nn.Identity(), n_q=n, n_kv=n,
                      q_positions=torch.arange(n, device=DEV), causal=True, key_padding=None, scaling=d ** -0.5,
                      extra={}, input_ids=None)
    mod = BlockSelect(method, block=block, k=5, keep_sink=True, keep_local=2, oracle_reduce="mass",
                      gates=gates if method.startswith("seer") else None)
    out = mod.attend(ctx, q, key, v)
    sel = mod.selection(ctx, q, key).cpu()
    assert sel.sum(-1)[..., 5:].unique().numel() > 1  # rows really keep different numbers of blocks
    i = torch.arange(n)
    mask = sel[:, :, i // block][:, :, :, i // block].repeat_interleave(hq // hkv, dim=1) & (i[None, :] <= i[:, None])
    ref = reference.attention(q, key, v, mask=mask.to(DEV))
    assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-2
