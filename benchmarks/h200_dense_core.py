"""H200: 1-D local attention as dense core (cuDNN) + edges (Triton) vs the plain Triton kernel and SDPA.

For each 1-D case (B=1, 16 heads, D=128, bf16, forward): dense SDPA (the ideal's basis), the plain
Triton kernel as ``attnlab.attention`` runs it, and the split of ``attnlab.kernels.dense_core`` over a
few tile / edge-pass options; then the core call alone and the edge pass alone, to see where the time
goes. Every split output is checked against the plain kernel's (all heads) and SDPA with a dense bool
mask (2 heads). Times are ``triton.testing.do_bench`` medians (L2 flushed between calls).

    OUT=outdir python3 benchmarks/h200_dense_core.py   # writes outdir/dense_core.json and .md
    OUT=outdir CASES=0 VARIANT_SET=s7 python3 benchmarks/h200_dense_core.py   # session 7's edge-pass sweep
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import attnlab  # noqa: E402
from attnlab.core.patterns import sliding_window  # noqa: E402
from attnlab.kernels import dense_core as dc  # noqa: E402
from attnlab.kernels import grouped_dense as gd  # noqa: E402
from attnlab.kernels import triton_local as tlo  # noqa: E402

OUT = os.environ.get("OUT", "out")
os.makedirs(OUT, exist_ok=True)
DEV = torch.device("cuda")
H, D, DT = 16, 128, torch.bfloat16
T0 = time.time()
RES: dict = {"env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "cudnn": torch.backends.cudnn.version()}, "cases": []}

CASES = [  # name, target fraction of the ideal, pattern, N
    ("1D window N/16 (2048), N=32K", 0.75, sliding_window(2048), 32768),
    ("1D window 2048 causal, N=32K", None, sliding_window(2048, causal=True), 32768),
    ("1D window N/16 (1024), N=16K", None, sliding_window(1024), 16384),
    ("1D window 4096, N=32K", None, sliding_window(4096), 32768),
]
PERSIST = {"persistent": 1, "flatten": True, "late_l": True}
VARIANTS = [  # name, edge q_tile, edge kv_tile, warps, stages, edge-pass options (the core: 128-row groups)
    ("split 64x32 w4 s3 hints, longest tiles first (the auto route's)", 64, 32, 4, 3, {"hints": True}),
    ("split 64x32 w4 s3 hints, tiles in turn", 64, 32, 4, 3, {"hints": True, "longest_first": False}),
    ("split 64x64 w4 s2 hints, longest tiles first", 64, 64, 4, 2, {"hints": True}),
    ("split 64x64 w4 s2 hints, tiles in turn", 64, 64, 4, 2, {"hints": True, "longest_first": False}),
    ("split 64x32 w4 s3 hints persistent, longest first", 64, 32, 4, 3,
     {"hints": True, "persistent": 3, "flatten": True, "late_l": True}),
]
# Session 7 (VARIANT_SET=s7): edge-pass options the session-6 sweeps did not try (TMA boxes, 16-bit exp,
# 128 x 32 tiles, a deeper pipeline, 16-key tiles, a register cap for a fourth resident program).
VARIANTS_S7 = [
    ("split 64x32 w4 s3 hints (the auto route's)", 64, 32, 4, 3, {"hints": True}),
    ("split 64x32 w4 s3 hints tma", 64, 32, 4, 3, {"hints": True, "use_tma": True}),
    ("split 64x32 w4 s3 hints half_exp", 64, 32, 4, 3, {"hints": True, "half_exp": True}),
    ("split 64x32 w4 s3 hints tma half_exp", 64, 32, 4, 3, {"hints": True, "use_tma": True, "half_exp": True}),
    ("split 64x32 w4 s4 hints", 64, 32, 4, 4, {"hints": True}),
    ("split 64x32 w4 s2 hints maxnreg128", 64, 32, 4, 2, {"hints": True, "maxnreg": 128}),
    ("split 64x16 w4 s3 hints", 64, 16, 4, 3, {"hints": True}),
    ("split 128x32 w8 s3 hints", 128, 32, 8, 3, {"hints": True}),
    ("split 128x32 w4 s3 hints", 128, 32, 4, 3, {"hints": True}),
    ("split 128x32 w8 s3 hints tma", 128, 32, 8, 3, {"hints": True, "use_tma": True}),
    ("split 64x32 w4 s3 hints late_l", 64, 32, 4, 3, {"hints": True, "late_l": True}),
    ("split 64x32 w4 s3 hints maxnreg128", 64, 32, 4, 3, {"hints": True, "maxnreg": 128}),
    ("split 64x32 w4 s2 hints maxnreg96", 64, 32, 4, 2, {"hints": True, "maxnreg": 96}),
    ("split 64x32 w4 s3 hints again (the auto route's, run-to-run spread)", 64, 32, 4, 3, {"hints": True}),
]
if os.environ.get("VARIANT_SET") == "s7":
    VARIANTS = VARIANTS_S7


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def ms(fn):
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def save():
    with open(os.path.join(OUT, "dense_core.json"), "w") as f:
        json.dump(RES, f, indent=1)
    with open(os.path.join(OUT, "dense_core.md"), "w") as f:
        f.write(markdown())


def markdown() -> str:
    e = RES["env"]
    lines = ["# H200: 1-D local attention, dense core (cuDNN) + edges (Triton) vs the plain Triton kernel", "",
             f"{e['gpu']}, torch {e['torch']}, cuDNN {e['cudnn']}; B=1, {H} heads, D={D}, bf16, forward; "
             "do_bench medians (ms); frac = speed-up over dense SDPA / the ideal 1/density.", "",
             "| case | density | ideal | SDPA ms | attnlab.attention ms (frac) | plain Triton ms (frac) | variant | split ms (frac) | core alone ms | "
             "edges alone ms | err vs plain | err vs SDPA-mask | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in RES["cases"]:
        for v in c.get("variants", []):
            if "error" in v:
                lines.append(f"| {c['case']} | | | | | | {v['name']} | error: {v['error'][:80]} | | | | | |")
                continue
            frac = c["sdpa_ms"] / v["ms"] / c["ideal"]
            tgt = "" if c["target"] is None else f"{c['target']} {'met' if frac >= c['target'] else 'NOT met'}"
            lines.append(
                f"| {c['case']} | {c['density']:.4f} | {c['ideal']:.1f} | {c['sdpa_ms']:.3f} | "
                f"{c['auto_ms']:.3f} ({c['sdpa_ms'] / c['auto_ms'] / c['ideal']:.2f}) | "
                f"{c['plain_ms']:.3f} ({c['sdpa_ms'] / c['plain_ms'] / c['ideal']:.2f}) | {v['name']} | "
                f"{v['ms']:.3f} ({frac:.2f}) | {v.get('core_ms', float('nan')):.3f} | {v.get('edge_ms', float('nan')):.3f} | "
                f"{v.get('err_vs_plain', float('nan')):.4f} | {v.get('err_vs_sdpa_mask', float('nan')):.4f} | {tgt} |")
    return "\n".join(lines) + "\n"


def run_case(name, target, p, n):
    log("case", name)
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, H, n, D, device=DEV, dtype=DT, generator=g) for _ in range(3))
    dens = p.density(n, n)
    row = dict(case=name, target=target, n=n, density=dens, ideal=1 / dens)
    row["sdpa_ms"] = ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    plain = attnlab.attention(q, k, v, pattern=p)
    row["auto_ms"] = ms(lambda: attnlab.attention(q, k, v, pattern=p))
    plan = tlo.cached_plan(p, n, n, (128,), (128,), DEV)
    row["plain_ms"] = ms(lambda: tlo.attention(q, k, v, p, q_tile=(128,), kv_tile=(128,), num_warps=8,
                                               options={**tlo.default_options(plan, 8), "dense_core": False}))
    ref2 = None
    try:
        ref2 = torch.nn.functional.scaled_dot_product_attention(q[:, :2], k[:, :2], v[:, :2], attn_mask=p.mask(n, n, device=DEV))
    except Exception as e:  # noqa: BLE001  (a 32K x 32K bool mask is 1 GiB: fine on an H200, noted otherwise)
        row["sdpa_mask_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    row["variants"] = []
    RES["cases"].append(row)
    for vname, qt, kt, w, s, opts in VARIANTS:
        r = {"name": vname}
        opts = dict(opts)
        longest_first = opts.pop("longest_first", True)  # the edge plan's launch order (cached_split)
        try:
            def split():
                return dc.attention(q, k, v, p, scale=D ** -0.5, q_tile=(qt,), kv_tile=(kt,), num_warps=w,
                                    num_stages=s, longest_first=longest_first, **opts)
            out = split()
            r["err_vs_plain"] = rel(out, plain)
            if ref2 is not None:
                r["err_vs_sdpa_mask"] = rel(out[:, :2], ref2)
            r["ms"] = ms(split)
            edge, c, idx = dc.cached_split(p, n, n, (qt,), (kt,), DEV, longest_first)
            qv = gd.fold(q, c.first * c.q_tile, c.q_tile, c.count, c.q_tile)
            kv = gd.fold(k, c.k_start, c.k_step, c.count, c.k_len)
            vv = gd.fold(v, c.k_start, c.k_step, c.count, c.k_len)
            r["core"] = dict(groups=c.count, q=c.q_tile, keys=c.k_len)
            r["core_ms"] = ms(lambda: dc.dense_with_lse(qv, kv, vv, D ** -0.5))
            o0, l0 = dc.dense_with_lse(qv, kv, vv, D ** -0.5)
            r["core_backend"] = "cudnn" if _works(dc._cudnn, qv, kv, vv) else "flash"
            r["core_strides"] = dict(out=list(o0.stride()), lse=list(l0.stride()), lse_shape=list(l0.shape))
            r["edge_ms"] = ms(lambda: tlo.local_attention(q, k, v, edge, scale=D ** -0.5, num_warps=w, num_stages=s,
                                                          init=(idx, o0, l0), **opts))
            log(f"  {vname}: {r['ms']:.3f} ms (frac {row['sdpa_ms'] / r['ms'] / row['ideal']:.3f}), core {r['core_ms']:.3f}, "
                f"edges {r['edge_ms']:.3f}, err vs plain {r['err_vs_plain']:.2e}")
        except Exception as e:  # noqa: BLE001  (one variant's failure must not hide the others)
            traceback.print_exc()
            r["error"] = f"{type(e).__name__}: {e}"[:400]
        row["variants"].append(r)
        save()
    log(f"  SDPA {row['sdpa_ms']:.3f} ms, attnlab.attention {row['auto_ms']:.3f} ms "
        f"(frac {row['sdpa_ms'] / row['auto_ms'] / row['ideal']:.3f}), plain Triton kernel {row['plain_ms']:.3f} ms "
        f"(frac {row['sdpa_ms'] / row['plain_ms'] / row['ideal']:.3f})")
    del q, k, v, plain, ref2
    torch.cuda.empty_cache()


def _works(op, q, k, v) -> bool:
    try:
        op(q, k, v, D ** -0.5)
        return True
    except RuntimeError:
        return False


def main():
    which = [int(i) for i in os.environ.get("CASES", ",".join(map(str, range(len(CASES))))).split(",")]
    for i in which:
        run_case(*CASES[i])
    print(markdown())


if __name__ == "__main__":
    main()
