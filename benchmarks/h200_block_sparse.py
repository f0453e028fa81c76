"""H200: attnlab's Triton block-sparse kernel on SeerAttention-style layouts, beside SDPA and FlexAttention.

B=1, H=16, N=32,768, D=128, bf16, block 128, causal; per-head random layouts keeping the diagonal block
and ceil(density * (row + 1)) causal blocks per row (as a threshold gate keeps; the layouts of
benchmarks/h200_seer.sh, session 2). Ideal = 1 / (fraction of causal blocks kept); speed-ups are over
dense causal SDPA (cuDNN) in the same run. Also: the kernel's core rate with every tile full
(all-ones layout, noncausal, N=16K) against dense SDPA, and each variant's error against SDPA with
the layout as a dense mask (2 heads).

Run through the device tool (see benchmarks/h200_seer.sh):
    OUT=out SEER_DENSITIES="0.10 0.20" FLEX=1 python3 benchmarks/h200_block_sparse.py
Writes $OUT/seer_h200_triton.json and .md after every section and prints the table last.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from attnlab.kernels import triton_block_sparse as tbs  # noqa: E402
from attnlab.core.patterns.block_sparse import random_causal_layout  # noqa: E402

OUT = os.environ.get("OUT", "out")
os.makedirs(OUT, exist_ok=True)
B, H, D, BS = 1, 16, 128, 128
DEV = "cuda"
T0 = time.time()
RES: dict = {"env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}, "core": [], "seer": []}
# (name, kwargs): tiles, warps, stages, TMA, hand-pipelined scores
VARIANTS = [
    # session 3's first run (benchmarks/results/seer_h200_triton.md): 128x128 w8 s3 best; pipe and 128x64 slower
    ("128x128 w8 s3", dict(q_tile=128, kv_tile=128, num_warps=8, num_stages=3)),
    ("128x128 w8 s3 tma", dict(q_tile=128, kv_tile=128, num_warps=8, num_stages=3, use_tma=True)),
    ("128x128 w8 s2", dict(q_tile=128, kv_tile=128, num_warps=8, num_stages=2)),
    ("128x128 w8 s2 pipe", dict(q_tile=128, kv_tile=128, num_warps=8, num_stages=2, pipeline=True)),
    # two programs per multiprocessor (96-104 KB of shared memory each; registers capped for 128x64)
    ("128x64 w8 s2 r128", dict(q_tile=128, kv_tile=64, num_warps=8, num_stages=2, maxnreg=128)),
    ("64x64 w4 s3", dict(q_tile=64, kv_tile=64, num_warps=4, num_stages=3)),
    ("128x128 w8 s3 pipe", dict(q_tile=128, kv_tile=128, num_warps=8, num_stages=3, pipeline=True)),
    ("128x64 w8 s3 pipe", dict(q_tile=128, kv_tile=64, num_warps=8, num_stages=3, pipeline=True)),
    ("128x64 w4 s3", dict(q_tile=128, kv_tile=64, num_warps=4, num_stages=3)),
]
if os.environ.get("VARIANTS"):
    keep = os.environ["VARIANTS"].split(",")
    VARIANTS = [v for v in VARIANTS if v[0] in keep]


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def ms(fn):
    return do_bench(fn, warmup=10, rep=int(os.environ.get("REP_MS", "60")), return_mode="median")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def seer_layout(nb, density):
    """(H, nb, nb) bool: diagonal + random causal blocks, ceil(density * (row + 1)) per row."""
    return random_causal_layout(nb, density, H, device=DEV)


def sdpa_masked_ref(q, k, v, layout, causal):
    """Heads 0-1 through SDPA with the layout expanded to a dense (2, N, N) mask: the check of every variant."""
    n = q.shape[2]
    idx = torch.arange(n, device=DEV) // BS
    m = layout[:2][:, idx][:, :, idx]  # (2, N, N)
    if causal:
        m = m & torch.ones(n, n, dtype=torch.bool, device=DEV).tril()
    ref = F.scaled_dot_product_attention(q[:, :2], k[:, :2], v[:, :2], attn_mask=m[None])
    del m
    return ref


def time_variants(q, k, v, layout, causal, base_ms, ideal, ref):
    rows = []
    for name, kw in VARIANTS:
        try:
            plan_kw = {a: kw[a] for a in ("q_tile", "kv_tile")}
            plan = tbs.build_plan(layout[None], BS, q.shape[2], k.shape[2], causal=causal, **plan_kw)
            run_kw = {a: b for a, b in kw.items() if a not in plan_kw}
            out = tbs.block_sparse_attention(q, k, v, None, BS, plan=plan, **run_kw)
            torch.cuda.synchronize()
            t = ms(lambda: tbs.block_sparse_attention(q, k, v, None, BS, plan=plan, **run_kw))
            r = dict(variant=name, ms=t, speedup=base_ms / t, frac_ideal=base_ms / t / ideal)
            r["err_vs_sdpa_mask"] = rel(out[:, :2], ref)
            r["finite"] = bool(torch.isfinite(out).all())
        except Exception as e:  # one variant failing to compile must not hide the others
            r = dict(variant=name, error=f"{type(e).__name__}: {str(e)[:300]}")
        log("  ", r)
        rows.append(r)
    return rows


def plan_build_ms(layout, n):
    """Host+device time to turn a (1, H, Qb, Kb) layout into tile lists (what a per-layer gate pays)."""
    return ms(lambda: tbs.build_plan(layout[None], BS, n, n, causal=True))


def save():
    json.dump(RES, open(os.path.join(OUT, "seer_h200_triton.json"), "w"), indent=1)
    open(os.path.join(OUT, "seer_h200_triton.md"), "w").write(markdown())


def markdown():
    lines = [f"{RES['env']}", "", "Core: every tile full (all-ones layout, noncausal)", "",
             "| N | SDPA ms | variant | ms | x SDPA (frac of ideal) | err |", "|---|---|---|---|---|---|"]
    for c in RES["core"]:
        for r in c["triton"]:
            lines.append(f"| {c['n']} | {c['sdpa_ms']:.3f} | {r['variant']} | {r.get('ms', float('nan')):.3f} | "
                         f"{r.get('frac_ideal', float('nan')):.3f} | {r.get('err_vs_sdpa_mask', r.get('error'))} |")
    lines += ["", "SeerAttention layouts, causal, N=32K (ideal = 1/density of causal blocks; fractions vs causal SDPA)", "",
              "| density | ideal | SDPA causal ms | flex causal ms | flex block-sparse ms (frac) | Triton variant | ms | frac of ideal | err |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in RES["seer"]:
        fx = s.get("flex_ms")
        for r in s["triton"]:
            lines.append(
                f"| {s['density']:.3f} | {s['ideal']:.2f} | {s['sdpa_causal_ms']:.3f} | {s.get('flex_causal_ms', float('nan')):.3f} | "
                f"{fx if fx is None else round(fx, 3)} ({s.get('flex_frac_ideal') and round(s['flex_frac_ideal'], 3)}) | "
                f"{r['variant']} | {r.get('ms', float('nan')):.3f} | {r.get('frac_ideal', float('nan')):.3f} | "
                f"{r.get('err_vs_sdpa_mask', r.get('error'))} |")
    return "\n".join(lines) + "\n"


def core(n):
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(3))
    sdpa = ms(lambda: F.scaled_dot_product_attention(q, k, v))
    nb = n // BS
    layout = torch.ones(H, nb, nb, dtype=torch.bool, device=DEV)
    log("core", n, "sdpa", sdpa)
    ref = F.scaled_dot_product_attention(q[:, :2], k[:, :2], v[:, :2])
    RES["core"].append(dict(n=n, sdpa_ms=sdpa, triton=time_variants(q, k, v, layout, False, sdpa, 1.0, ref)))
    save()


def seer(n, densities, flex_on):
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(3))
    sdpa = ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    nb = n // BS
    causal_blocks = nb * (nb + 1) // 2
    log("seer: SDPA causal", sdpa)
    layouts = {d: seer_layout(nb, d) for d in densities}
    for d, lay in layouts.items():
        real = lay.sum().item() / (H * causal_blocks)
        row = dict(density=real, ideal=1 / real, sdpa_causal_ms=sdpa, plan_build_ms=plan_build_ms(lay, n))
        log("seer density", real, "plan build ms", row["plan_build_ms"])
        row["triton"] = time_variants(q, k, v, lay, True, sdpa, 1 / real, sdpa_masked_ref(q, k, v, lay, True))
        RES["seer"].append(row)
        save()
    if not flex_on:
        return
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)

    def causal_mod(b, h, qi, kj):
        return qi >= kj

    bm = create_block_mask(causal_mod, None, None, n, n, device=DEV, BLOCK_SIZE=BS)
    flex(q, k, v, block_mask=bm)
    flex_causal = ms(lambda: flex(q, k, v, block_mask=bm))
    log("flex causal", flex_causal)
    i = torch.arange(nb, device=DEV)
    for row, lay in zip(RES["seer"][-len(layouts):], layouts.values()):
        diag = torch.zeros_like(lay)
        diag[:, i, i] = True

        def pack(sel):
            cnt = sel.sum(-1).to(torch.int32)
            idx = sel.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
            return cnt[None].contiguous(), idx[None].contiguous()

        kn, ki = pack(lay & diag)
        fn_, fi = pack(lay & ~diag)
        bms = BlockMask.from_kv_blocks(kn, ki, fn_, fi, BLOCK_SIZE=BS, mask_mod=causal_mod)
        flex(q, k, v, block_mask=bms)
        t = ms(lambda: flex(q, k, v, block_mask=bms))
        row.update(flex_causal_ms=flex_causal, flex_ms=t, flex_frac_ideal=sdpa / t / row["ideal"])
        log("flex block-sparse", row["density"], t, row["flex_frac_ideal"])
        save()


def main():
    dens = [float(x) for x in os.environ.get("SEER_DENSITIES", "0.10 0.20").split()]
    if os.environ.get("CORE", "1") == "1":
        core(16384)
    seer(32768, dens, os.environ.get("FLEX", "1") == "1")
    print(markdown())


if __name__ == "__main__":
    main()
