"""The output-aware SeerAttention target "dev" (ours): p_qk * ||v_k - o_q|| pooled to tiles, against float64."""
from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnlab.hf.attach import attach
from attnlab.interventions.base import Modifier
from attnlab.probes.base import CallContext
from attnlab.sparse.seer import (
    PooledDeviation, calibration_targets, deviation_weights, out_proj_factor, target_distribution,
)
from attnlab.sparse.seer_prefill import BlockSelect, forced_blocks, oracle_pooled


class _Attn(torch.nn.Module):
    """An attention module's output projection only (what "devo" reads): o_proj (hidden, Hq * Dv)."""

    def __init__(self, hq: int, dv: int, hidden: int, gen: torch.Generator):
        super().__init__()
        self.o_proj = torch.nn.Linear(hq * dv, hidden, bias=False)
        with torch.no_grad():
            self.o_proj.weight.copy_(torch.randn(hidden, hq * dv, generator=gen))


def _probs64(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """(B, Hq, N, N) float64 causal softmax, query head h reading KV head h // G."""
    g = q.shape[1] // k.shape[1]
    s = q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) * scaling
    n = q.shape[2]
    return s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)


def _dev64(p: torch.Tensor, v: torch.Tensor, block: int, w: torch.Tensor | None = None) -> torch.Tensor:
    """float64 re-statement from the explicit (N, N) map: (B, Hq, Qb, Kb) mean over a tile's query rows of
    sum over its keys of p_qk * ||W_h (v_k - o_q)|| (W_h = identity, or head h's o_proj slice (hidden, Dv))."""
    b, hq, n, _ = p.shape
    v = v.double().repeat_interleave(hq // v.shape[1], 1)  # (B, Hq, N, Dv)
    o = p @ v
    diff = v[:, :, None, :, :] - o[:, :, :, None, :]  # (B, Hq, Nq, Nk, Dv): explicit, tiny sizes only
    if w is not None:
        diff = torch.einsum("hed,bhqkd->bhqke", w.double(), diff)
    x = p * diff.norm(dim=-1)
    return x.view(b, hq, n // block, block, n // block, block).sum(5).mean(3)


@settings(max_examples=25, deadline=None)
@given(hkv=st.integers(1, 2), g=st.integers(1, 3), qb=st.integers(1, 4), block=st.sampled_from([1, 2, 4]),
       chunk=st.integers(1, 7), out_proj=st.booleans(), seed=st.integers(0, 10_000))
def test_pooled_deviation_matches_float64_restatement(hkv, g, qb, block, chunk, out_proj, seed):
    gen = torch.Generator().manual_seed(seed)
    hq, n, d, dv = hkv * g, qb * block, 4, 3
    q, k = torch.randn(1, hq, n, d, generator=gen), torch.randn(1, hkv, n, d, generator=gen)
    v = torch.randn(1, hkv, n, dv, generator=gen) * 2
    module = _Attn(hq, dv, 5, gen)
    p = _probs64(q, k, 0.5)
    obs = PooledDeviation(block, {0: v}, out_proj=out_proj)
    ctx = CallContext(layer=0, n_layers=1, module=module, n_q=n, n_kv=n, q_positions=torch.arange(n), causal=True)
    for r0 in range(0, n, chunk):  # chunks of ``chunk`` rows straddle the blocks
        obs.observe(ctx, r0, p[:, :, r0:r0 + chunk].float())
    w = module.o_proj.weight.detach().view(5, hq, dv).permute(1, 0, 2) if out_proj else None
    ref = _dev64(p, v, block, w)
    # float32 ||v - o|| from the expanded square: about sqrt(1e-7) * ||v|| absolute where o ~ v (a peaked row)
    assert torch.allclose(obs.maps[0].double(), ref, rtol=1e-3, atol=2e-3), (obs.maps[0] - ref).abs().max()
    t = target_distribution(obs.maps[0], hkv, "sum")  # the gates' "dev" target
    ref_t = ref.view(1, hkv, g, qb, qb).sum(2)
    live = ref_t.sum(-1) > 1e-3  # a first block of one token: its query sees itself only, o = v, nothing to rank
    ref_t = ref_t / ref_t.sum(-1, keepdim=True)
    assert torch.allclose(t.double()[live], ref_t[live], rtol=1e-3, atol=1e-3)
    assert torch.allclose(t.sum(-1)[live], torch.ones(()), atol=1e-5)
    assert (t.triu(1) == 0).all()  # nothing outside the causal blocks


def test_deviation_weights_first_order_output_change():
    # the weight is the norm of the first-order change of o when key k alone is dropped: o' - o = p (o - v) / (1 - p)
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(1, 1, 3, 6, generator=gen, dtype=torch.float64).softmax(-1)
    v = torch.randn(1, 1, 6, 4, generator=gen, dtype=torch.float64)
    w = deviation_weights(p, v)
    o = p @ v
    for kk in range(6):
        keep = torch.ones(6, dtype=torch.bool)
        keep[kk] = False
        p2 = p * keep
        o2 = (p2 / p2.sum(-1, keepdim=True)) @ v
        assert torch.allclose((o2 - o).norm(dim=-1) * (1 - p[..., kk]), w[..., kk])
    r = out_proj_factor(_Attn(1, 4, 7, gen), 1)
    assert r.shape == (1, 4, 4)


@settings(max_examples=20, deadline=None)
@given(hkv=st.integers(1, 2), g=st.integers(1, 3), qb=st.integers(1, 5), block=st.sampled_from([1, 2, 4]),
       rows=st.integers(1, 9), seed=st.integers(0, 10_000))
def test_oracle_dev_map_matches_float64(hkv, g, qb, block, rows, seed):
    gen = torch.Generator().manual_seed(seed)
    hq, n = hkv * g, qb * block
    q, k = torch.randn(1, hq, n, 4, generator=gen), torch.randn(1, hkv, n, 4, generator=gen)
    v = torch.randn(1, hkv, n, 3, generator=gen)
    module = _Attn(hq, 3, 6, gen)
    p = _probs64(q, k, 0.7)
    for reduce, w in (("dev", None), ("devo", module.o_proj.weight.detach().view(6, hq, 3).permute(1, 0, 2))):
        got = oracle_pooled(q, k, 0.7, block, reduce, rows=rows * block, value=v,
                            out_r=out_proj_factor(module, hq) if reduce == "devo" else None)
        ref = _dev64(p, v, block, w).view(1, hkv, g, qb, qb).sum(2) * block  # summed (not mean) over query rows
        assert torch.allclose(got.double(), ref, rtol=1e-3, atol=4e-3), reduce
    with pytest.raises(ValueError, match="needs the values"):
        oracle_pooled(q, k, 0.7, block, "dev")
    with pytest.raises(ValueError, match="out_r"):
        oracle_pooled(q, k, 0.7, block, "devo", value=v)
    with pytest.raises(ValueError, match="oracle_reduce"):
        BlockSelect("oracle_topk", block=block, k=1, oracle_reduce="deviation")


def _ids(tok, n: int) -> torch.Tensor:
    text = resources.files("attnlab.data").joinpath("kjv_genesis.txt").read_text()
    return tok(text, return_tensors="pt").input_ids[:, :n]


class _Grab(Modifier):
    """Keeps each layer's query, key and value as attach passes them to score_bias."""

    def __init__(self):
        self.qkv = {}

    def score_bias(self, ctx):
        self.qkv[ctx.layer] = (ctx.extra["query"].detach(), ctx.extra["key"].detach(), ctx.extra["value"].detach(),
                               ctx.scaling, out_proj_factor(ctx.module, ctx.extra["query"].shape[1]))
        return None


def test_dev_targets_on_smollm_equal_float64_from_the_calls_qkv(smollm):
    model, tok = smollm
    ids = _ids(tok, 48)
    grab = _Grab()
    with torch.no_grad(), attach(model, modifiers=[grab]):
        model(input_ids=ids)
    out = calibration_targets(model, ids, block=16, chunk=20, targets=("dev", "devo", "mass"), totals=True)
    assert sorted(out) == ["dev", "dev_total", "devo", "devo_total", "mass"]
    hkv = model.config.num_key_value_heads
    for layer in (0, 8, 29):
        q, k, v, scaling, _ = grab.qkv[layer]
        p = _probs64(q, k, scaling)
        wo = model.model.layers[layer].self_attn.o_proj.weight.detach()
        hq = q.shape[1]
        w = wo.view(wo.shape[0], hq, -1).permute(1, 0, 2)
        for t, ww in (("dev", None), ("devo", w)):
            ref = _dev64(p, v, 16, ww).view(1, hkv, hq // hkv, 3, 3).sum(2)
            total = out[f"{t}_total"][layer][2]
            assert torch.allclose(total.double(), ref.sum(-1), rtol=1e-3), (t, layer)
            ref = ref / ref.sum(-1, keepdim=True)
            got = out[t][layer][2]
            assert torch.allclose(got.double(), ref, atol=2e-4), (t, layer, (got - ref).abs().max())
        assert not torch.allclose(out["dev"][layer][2], out["mass"][layer][2], atol=1e-3)  # it re-ranks


def test_dev_oracle_selections_stay_causal_and_keep_forced_blocks_on_smollm(smollm):
    model, tok = smollm
    ids = _ids(tok, 128)
    qb = 8
    causal = torch.ones(qb, qb, dtype=torch.bool).tril()
    forced = forced_blocks(qb, True, 2) & causal
    head_k = {i: [3, 4, 5] for i in range(30)}
    for kw in ({"method": "oracle_topk", "k": 4, "oracle_reduce": "dev"},
               {"method": "oracle_headk", "head_k": head_k, "oracle_reduce": "dev"},
               {"method": "oracle_topk", "k": 3, "oracle_reduce": "devo"}):
        mod = BlockSelect(block=16, keep_sink=True, keep_local=2, **kw)
        seen = []
        orig = mod.selection
        mod.selection = lambda ctx, q, k, *v: seen.append(orig(ctx, q, k, *v)) or seen[-1]
        with torch.no_grad(), attach(model, modifiers=[mod]):
            model(input_ids=ids)
        assert len(seen) == 30
        for layer, sel in enumerate(seen):
            assert not (sel & ~causal).any()
            assert sel[..., forced].all() and sel[..., torch.eye(qb, dtype=torch.bool)].all()
            ks = head_k[layer] if kw["method"] == "oracle_headk" else [kw["k"]] * 3
            for h in range(3):
                assert (sel[0, h].sum(-1) == torch.clamp(torch.arange(1, qb + 1), max=ks[h])).all()


def test_benchmark_parses_dev_options():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "seer_smollm2.py"
    spec = importlib.util.spec_from_file_location("seer_smollm2_bench_dev", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.parse_method("oracle_headk+dev+sink+local2+adev") == (
        "oracle_headk", {"oracle_reduce": "dev", "keep_sink": True, "keep_local": 2, "alloc": "dev"})
    assert bench.parse_method("seer_headk+sink+tdev")[1]["gate_target"] == "dev"
    assert bench.parse_variant("d:target=dev,qstats=3") == ("d", {"target": "dev", "qstats": 3})
    with pytest.raises(ValueError, match="target"):
        bench.parse_variant("d:target=foo")
    with pytest.raises(ValueError, match="headk only"):
        bench.parse_method("oracle_topk+adev")



def test_row_weighted_kept_curve_is_the_weighted_mean_of_row_shares():
    from attnlab.sparse.seer_adaptive import allocate_head_k, kept_mass_curve

    gen = torch.Generator().manual_seed(3)
    qb, k_max = 6, 4
    target = target_distribution(torch.rand(2, 4, qb, qb, generator=gen), 2, "sum")
    forced = forced_blocks(qb, True, 2) & torch.ones(qb, qb, dtype=torch.bool).tril()
    w = torch.rand(2, 2, qb, generator=gen) * 5
    got = kept_mass_curve(target, forced, k_max, row_weight=w)
    t = target.double()
    for h in range(2):
        for k in range(1, k_max + 1):
            tot = 0.0
            for b in range(2):
                for i in range(qb):  # float64: the forced blocks (and the diagonal), then the best free ones
                    keep = [j for j in range(i + 1) if forced[i, j] or j == i]
                    free = sorted((j for j in range(i + 1) if j not in keep), key=lambda j: -t[b, h, i, j].item())
                    chosen = keep + free[:max(k - len(keep), 0)]
                    tot += w[b, h, i].item() * sum(t[b, h, i, j].item() for j in chosen)
            assert abs(got[h, k].item() - tot / (2 * qb)) < 1e-5, (h, k)
    plain = kept_mass_curve(target, forced, k_max)
    assert torch.allclose(kept_mass_curve(target, forced, k_max, row_weight=torch.ones(2, 2, qb)), plain)
    # rows of one head weighted 10x: the budget moves to it
    w2 = torch.ones(2, 2, qb)
    w2[:, 1] = 10
    a1 = allocate_head_k({0: plain}, qb, 4, k_min=3)[0]
    a2 = allocate_head_k({0: kept_mass_curve(target, forced, k_max, row_weight=w2)}, qb, 4, k_min=3)[0]
    assert a2[1] >= a1[1] and a2[0] <= a1[0]
