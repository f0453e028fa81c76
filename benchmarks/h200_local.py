"""H200 check-and-benchmark of attnlab's Triton local-attention kernel (run by benchmarks/h200_run.sh).

1. correctness: the Triton kernel against the float64 reference on small random shapes (1/2/3-D,
   strided, causal, blocked, GQA, Nq != Nk, odd head dims, non-divisible grids, three dtypes);
2. for each benchmark case (B=1, 16 heads, D=128, bf16, forward): dense SDPA, dense through
   attnlab.attention, compiled FlexAttention on row-major tokens and on tile-permuted tokens, and the
   Triton kernel over a few tile / warp / stage configurations; the best Triton output is checked
   against SDPA with a dense boolean mask (2 heads) and against FlexAttention.

Writes $OUT/h200_kernels.json and $OUT/h200_kernels.md (after every case, so a timeout keeps the
finished ones) and prints the table last.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
import traceback

import torch
import torch._dynamo
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from attnlab import reference  # noqa: E402
from attnlab.core.patterns import blocked, causal, neighborhood, sliding_window  # noqa: E402
from attnlab.kernels import triton_local as tlo  # noqa: E402
from bench_cases import run_selected  # noqa: E402  (benchmarks/, the script's folder)

OUT = os.environ.get("OUT", "out")
# One compiled flex graph per pattern (dynamo guards on the mask_mod): allow more than the default 8.
for _name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 256)
os.makedirs(OUT, exist_ok=True)
QUICK = os.environ.get("QUICK", "0") == "1"
TAG = os.environ.get("TAG", "")
DEV = torch.device("cuda")
H, D, DT = 16, 128, torch.bfloat16
RESULTS: dict = {"env": {}, "correctness": [], "cases": [], "dense": {}, "notes": []}
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def save():
    with open(os.path.join(OUT, f"h200_kernels{TAG}.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    with open(os.path.join(OUT, f"h200_kernels{TAG}.md"), "w") as f:
        f.write(markdown())


def ms(fn, rep=200):
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------
# 1. correctness on small shapes
# ---------------------------------------------------------------------------------------------

TOL = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}


CHECK_TMA = False


def correctness():
    g = torch.Generator(device="cpu").manual_seed(0)
    cases = [
        # (pattern, Nq, Nk, Hq, Hkv, D, Dv, q_tile, kv_tile)
        (sliding_window(33), 300, 300, 4, 2, 64, 64, None, None),
        (sliding_window(65, causal=True), 200, 520, 4, 1, 128, 128, None, None),
        (sliding_window(17), 1, 1, 2, 2, 64, 64, None, None),
        (causal(), 190, 70, 2, 1, 64, 64, None, None),  # Nq > Nk: the first rows see nothing
        (neighborhood((23, 29), (7, 9)), 667, 667, 4, 2, 80, 48, None, None),
        (neighborhood((32, 32), 9, stride=(2, 3)), 1024, 1024, 2, 1, 128, 128, (8, 16), (8, 8)),
        (neighborhood((32, 48), (5, 13), causal=(True, False)), 1536, 1536, 2, 2, 64, 64, (8, 16), (8, 16)),
        (blocked((40, 40), 8, 4), 1600, 1600, 2, 2, 64, 64, (8, 16), (8, 8)),
        (neighborhood((9, 12, 16), (3, 5, 7)), 1728, 1728, 2, 1, 64, 64, None, None),
        (neighborhood((8, 16, 16), (4, 8, 8), stride=(2, 4, 4), causal=(True, False, False)), 2048, 2048, 2, 2, 128, 128,
         (4, 4, 8), (2, 4, 8)),
        (neighborhood(777, 101, stride=5), 777, 777, 2, 2, 256, 256, None, None),
    ]
    runs = [(torch.bfloat16, c) for c in cases]
    if os.environ.get("FULL_CHECK", "1") == "1":
        runs += [(dt, c) for dt in (torch.float32, torch.float16) for c in cases[:6]]
    for dt, (p, nq, nk, hq, hkv, d, dv, qt, kt) in runs:
        if True:
            try:
                q = torch.randn(2, hq, nq, d, generator=g).to(DEV, dt)
                k = torch.randn(2, hkv, nk, d, generator=g).to(DEV, dt)
                v = torch.randn(2, hkv, nk, dv, generator=g).to(DEV, dt)
                if qt is None and not CHECK_TMA:  # the second pass checks TMA + full-box on a plan
                    out = tlo.run_pattern(q, k, v, p, d ** -0.5)
                else:
                    if qt is None:
                        qt, kt, _ = tlo.choose_tiles(p, nq, nk, max(d, dv), DEV)
                    plan = tlo.cached_plan(p, nq, nk, qt, kt, DEV)
                    out = torch.full((2, hq, nq, dv), float("nan"), device=DEV, dtype=dt)  # poison
                    tlo.local_attention(q, k, v, plan, out=out, use_tma=CHECK_TMA, full_box=CHECK_TMA)
                torch.cuda.synchronize()
                ref = reference.attention(q, k, v, pattern=p)
                err = rel(out, ref)
                ok = bool(torch.isfinite(out).all()) and err < TOL[dt]
                row = dict(tma=CHECK_TMA, pattern=repr(p), nq=nq, nk=nk, hq=hq, hkv=hkv, d=d, dv=dv, dtype=str(dt), err=err, ok=ok)
            except Exception as e:  # record and go on: one failure must not hide the others
                row = dict(pattern=repr(p), dtype=str(dt), ok=False, error=f"{type(e).__name__}: {e}"[:500])
                traceback.print_exc()
            RESULTS["correctness"].append(row)
            log("check", row.get("ok"), row["pattern"], row["dtype"], f"err={row.get('err', row.get('error'))}")
    save()


# ---------------------------------------------------------------------------------------------
# 2. benchmark
# ---------------------------------------------------------------------------------------------


def qkv(n, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return [torch.randn(1, H, n, D, device=DEV, dtype=DT, generator=g) for _ in range(3)]


_dense: dict = {}


def dense_times(n):
    if n in _dense:
        return _dense[n]
    q, k, v = qkv(n)
    F = torch.nn.functional.scaled_dot_product_attention
    r = {"sdpa_ms": ms(lambda: F(q, k, v), rep=400)}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(be):
                F(q, k, v)
                r[f"sdpa_{name}_ms"] = ms(lambda: F(q, k, v))
        except Exception as e:
            r[f"sdpa_{name}_ms"] = None
            RESULTS["notes"].append(f"SDPA backend {name} at N={n}: {type(e).__name__}: {str(e)[:200]}")
    try:
        import attnlab

        fn = getattr(attnlab, "attention", None)
        if fn is None:
            from attnlab.kernels.attention import attention as fn
        r["attnlab_dense_ms"] = ms(lambda: fn(q, k, v), rep=400)
        r["sdpa_ms_again"] = ms(lambda: F(q, k, v), rep=400)  # spread of the baseline itself
    except Exception as e:
        r["attnlab_dense_ms"] = None
        RESULTS["notes"].append(f"attnlab dense at N={n}: {type(e).__name__}: {str(e)[:300]}")
    flops = 4 * n * n * D * H
    r["sdpa_tflops"] = flops / r["sdpa_ms"] / 1e9
    _dense[n] = r
    RESULTS["dense"][str(n)] = r
    log("dense", n, {a: (round(b, 3) if isinstance(b, float) else b) for a, b in r.items()})
    return r


def flex_times(p, n, q, k, v):
    """Compiled FlexAttention with H2's analytic block masks: row-major, and tile-permuted tokens."""
    r = {}
    try:
        from attnlab.kernels import flex as F

        fx = F.compiled_flex()
        bm = F.block_mask(p, n, n, DEV)
        out = fx(q, k, v, block_mask=bm)
        r["flex_rowmajor_ms"] = ms(lambda: fx(q, k, v, block_mask=bm))
        r["flex_rowmajor_block_density"] = p.block_layout(n, n).density
        r["_flex_out"] = out
        order = p.token_order(n, n)
        if order is not None:
            pp = p.permuted()
            order = order.to(DEV)
            qp, kp, vp = q[:, :, order], k[:, :, order], v[:, :, order]
            bmp = F.block_mask(pp, n, n, DEV)
            fx(qp, kp, vp, block_mask=bmp)
            r["flex_permuted_ms"] = ms(lambda: fx(qp, kp, vp, block_mask=bmp))
            r["flex_permuted_block_density"] = pp.block_layout(n, n).density
            r["flex_attnlab_ms"] = ms(lambda: F.flex(q, k, v, p, D ** -0.5))  # incl. permute/unpermute
    except Exception as e:
        r["flex_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        traceback.print_exc()
    return r


# (use_tma, warp_specialize) variants of the kernel to time; "ptr" gathers rows with plain loads.
VARIANTS = [tuple(v == "1" for v in (x + ":0:0").split(":")[:3]) for x in os.environ.get("VARIANTS", "0:0:1,0:0:0,1:0:1").split(",")]


def triton_times(p, n, q, k, v, configs):
    r = {"configs": []}
    best = None
    for qt, kt, warps, stages in configs:
        plan = tlo.cached_plan(p, n, n, qt, kt, DEV)
        for tma, ws, box in VARIANTS:
            cfg = dict(q_tile=qt, kv_tile=kt, num_warps=warps, num_stages=stages, use_tma=tma, warp_specialize=ws,
                       full_box=box,
                       block_density=plan.block_density, full_fraction=plan.tiles_full / max(plan.tiles_visited, 1))
            kw = dict(num_warps=warps, num_stages=stages, use_tma=tma, warp_specialize=ws, full_box=box)
            try:
                t_c = time.time()
                tlo.local_attention(q, k, v, plan, **kw)
                torch.cuda.synchronize()
                cfg["compile_s"] = time.time() - t_c
                cfg["ms"] = ms(lambda: tlo.local_attention(q, k, v, plan, **kw))
            except Exception as e:
                cfg["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc(limit=2)
            r["configs"].append(cfg)
            log("  triton", qt, kt, f"w{warps} s{stages} tma={int(tma)} ws={int(ws)} box={int(box)}", cfg.get("ms", cfg.get("error")))
            if "ms" in cfg and (best is None or cfg["ms"] < best["ms"]):
                best = cfg
    r["best"] = best
    try:  # the public call: attnlab.attention picks the kernel (the Triton one on CUDA) and its tiles
        import attnlab

        r["attnlab_auto_ms"] = ms(lambda: attnlab.attention(q, k, v, pattern=p))
        r["default_tiles"] = repr(tlo.choose_tiles(p, n, n, D, DEV))
    except Exception as e:
        r["attnlab_auto_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return r


def check_at_size(p, n, q, k, v, best, flex_out):
    """Best config's output vs SDPA with a dense bool mask (2 heads) and vs FlexAttention (all heads)."""
    r = {}
    plan = tlo.cached_plan(p, n, n, best["q_tile"], best["kv_tile"], DEV)
    out = tlo.local_attention(q, k, v, plan, num_warps=best["num_warps"], num_stages=best["num_stages"],
                              use_tma=best["use_tma"], warp_specialize=best["warp_specialize"],
                              full_box=best["full_box"])
    if flex_out is not None:
        r["err_vs_flex"] = rel(out, flex_out)
    try:
        mask = p.mask(n, n, device=DEV)
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :2], k[:, :2], v[:, :2], attn_mask=mask)
        r["err_vs_sdpa_mask"] = rel(out[:, :2], ref)
        del mask
    except Exception as e:
        r["sdpa_mask_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    r["finite"] = bool(torch.isfinite(out).all())
    return r


W8, W4 = 8, 4
T1, T1s = ((128,), (128,)), ((128,), (64,))
CASES = [
    # name, target fraction of ideal, pattern, N, configs (q_tile, kv_tile, warps, stages)
    ("1D window N/16 (2048), N=32K", 0.75, sliding_window(2048), 32768, [(*T1, W8, 3)]),
    ("all tiles full (window 2N: dense work through the kernel), N=16K", None, sliding_window(32768), 16384,
     [(*T1, W8, 3)]),
    ("2D NA 128x128 k=33 s=1", 0.40, neighborhood((128, 128), 33), 16384,
     [((8, 8), (8, 8), W4, 3), ((8, 16), (8, 16), W8, 3)]),
    ("2D strided NA 128x128 k=48 s=16 (tile-aligned)", 0.80, neighborhood((128, 128), 48, stride=16), 16384,
     [((8, 16), (8, 16), W8, 3)]),
    ("2D blocked 128x128 block 16 halo 8 (tile-aligned)", 0.80, blocked((128, 128), 16, 8), 16384,
     [((8, 8), (8, 8), W4, 3), ((8, 16), (8, 8), W8, 3)]),
    ("1D strided NA N=32K k=2048 s=256 (tile-aligned)", 0.80, neighborhood(32768, 2048, stride=256), 32768,
     [(*T1, W8, 3)]),
    ("3D NA 16x32x64 k=(8,16,16) s=1", None, neighborhood((16, 32, 64), (8, 16, 16)), 32768,
     [((4, 4, 4), (4, 4, 4), W4, 3), ((4, 4, 8), (4, 4, 8), W8, 3)]),
    ("1D window 2048 causal, N=32K", None, sliding_window(2048, causal=True), 32768, [(*T1, W8, 3)]),
]

W16 = 16
EXPLORE_CASES = [
    ("1D window N/16 (2048), N=32K", 0.75, sliding_window(2048), 32768, [(*T1, W8, 3)]),
    ("all tiles full (window 2N: dense work through the kernel), N=16K", None, sliding_window(32768), 16384,
     [(*T1, W8, 3)]),
    ("2D NA 128x128 k=33 s=1", 0.40, neighborhood((128, 128), 33), 16384, [((8, 8), (8, 8), W4, 3)]),
    ("2D strided NA 128x128 k=48 s=16 (tile-aligned)", 0.80, neighborhood((128, 128), 48, stride=16), 16384,
     [((8, 16), (8, 16), W8, 3)]),
    ("2D blocked 128x128 block 16 halo 8 (tile-aligned)", 0.80, blocked((128, 128), 16, 8), 16384,
     [((8, 8), (8, 8), W4, 3)]),
    ("1D strided NA N=32K k=2048 s=256 (tile-aligned)", 0.80, neighborhood(32768, 2048, stride=256), 32768,
     [(*T1, W8, 3)]),
    ("3D NA 16x32x64 k=(8,16,16) s=1", None, neighborhood((16, 32, 64), (8, 16, 16)), 32768,
     [((4, 4, 8), (4, 4, 8), W8, 3), ((4, 4, 4), (4, 4, 4), W4, 3)]),
]
if os.environ.get("EXPLORE") == "1":
    CASES = EXPLORE_CASES


def run_case(name, target, p, n, tiles):
    log("case", name)
    row = dict(case=name, pattern=repr(p), n=n, target_fraction=target)
    dens = p.density(n, n)
    row["density"] = dens
    row["ideal_speedup"] = 1 / dens
    dense = dense_times(n)
    row["sdpa_dense_ms"] = dense["sdpa_ms"]
    q, k, v = qkv(n, seed=1)
    f = flex_times(p, n, q, k, v) if os.environ.get("FLEX", "1") == "1" else {}
    flex_out = f.pop("_flex_out", None)
    row.update(f)
    t = triton_times(p, n, q, k, v, tiles)
    row["triton"] = t
    best = t["best"]
    row["attnlab_auto_ms"] = t.get("attnlab_auto_ms")
    if best is not None:
        row["triton_ms"] = best["ms"]
        row.update(check_at_size(p, n, q, k, v, best, flex_out))
    base = dense["sdpa_ms"]
    for key in ("flex_rowmajor_ms", "flex_permuted_ms", "flex_attnlab_ms", "triton_ms", "attnlab_auto_ms"):
        if row.get(key):
            row[key.replace("_ms", "_speedup")] = base / row[key]
            row[key.replace("_ms", "_frac_ideal")] = base / row[key] / row["ideal_speedup"]
    if target is not None and row.get("triton_frac_ideal") is not None:
        row["target_met"] = row["triton_frac_ideal"] >= target
    RESULTS["cases"].append(row)
    save()
    del q, k, v, flex_out
    torch.cuda.empty_cache()


def fmt(x, nd=2):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def markdown() -> str:
    e = RESULTS["env"]
    lines = [
        "# H200: attnlab Triton local-attention kernel vs SDPA and FlexAttention",
        "",
        f"{e.get('gpu')}, torch {e.get('torch')}, triton {e.get('triton')}; B=1, {H} heads, D={D}, bf16, forward.",
        "Times are medians of `triton.testing.do_bench` (L2 flushed between calls). Speed-up is over dense",
        "SDPA at the same N; 'frac' is that speed-up over the ideal 1/element-density. Flex 'perm' runs on",
        "tokens already in tile order (permutation not timed); Flex 'attnlab' is `attnlab.kernels.flex.flex`",
        "including the permutation; the Triton kernel reads and writes the caller's row-major order.",
        "'attnlab.attention' is the public call (auto dispatch, default tiles of `choose_tiles`).",
        "",
        "| case | density | ideal | SDPA ms | flex row-major ms (frac) | flex perm ms (frac) | flex attnlab ms (frac) | triton best ms (frac) | target | triton best cfg | attnlab.attention ms (frac) | err vs SDPA-mask |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in RESULTS["cases"]:
        b = (r.get("triton") or {}).get("best") or {}
        cfg = (f"{b.get('q_tile')}x{b.get('kv_tile')} w{b.get('num_warps')} s{b.get('num_stages')}"
               + (" box" if b.get("full_box") else "") + (" tma" if b.get("use_tma") else "")) if b else "-"
        lines.append(
            f"| {r['case']} | {r['density']:.4f} | {r['ideal_speedup']:.1f} | {fmt(r['sdpa_dense_ms'], 3)} "
            f"| {fmt(r.get('flex_rowmajor_ms'), 3)} ({fmt(r.get('flex_rowmajor_frac_ideal'))}) "
            f"| {fmt(r.get('flex_permuted_ms'), 3)} ({fmt(r.get('flex_permuted_frac_ideal'))}) "
            f"| {fmt(r.get('flex_attnlab_ms'), 3)} ({fmt(r.get('flex_attnlab_frac_ideal'))}) "
            f"| {fmt(r.get('triton_ms'), 3)} ({fmt(r.get('triton_frac_ideal'))}) "
            f"| {fmt(r.get('target_fraction'))} {'met' if r.get('target_met') else ('NOT met' if r.get('target_met') is False else '')} "
            f"| {cfg} | {fmt(r.get('attnlab_auto_ms'), 3)} ({fmt(r.get('attnlab_auto_frac_ideal'))}) "
            f"| {fmt(r.get('err_vs_sdpa_mask'), 4)} |"
        )
    lines += ["", "Dense (attnlab.attention with no pattern vs SDPA):", "",
              "| N | SDPA ms | SDPA again ms | attnlab ms | attnlab/SDPA | flash ms | cudnn ms | efficient ms | SDPA TFLOP/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for n, r in RESULTS["dense"].items():
        ratio = r["attnlab_dense_ms"] / r["sdpa_ms"] if r.get("attnlab_dense_ms") else None
        lines.append(f"| {n} | {fmt(r['sdpa_ms'], 3)} | {fmt(r.get('sdpa_ms_again'), 3)} | {fmt(r.get('attnlab_dense_ms'), 3)} "
                     f"| {fmt(ratio, 3)} | {fmt(r.get('sdpa_flash_ms'), 3)} | {fmt(r.get('sdpa_cudnn_ms'), 3)} "
                     f"| {fmt(r.get('sdpa_efficient_ms'), 3)} | {fmt(r['sdpa_tflops'], 0)} |")
    n_ok = sum(1 for c in RESULTS["correctness"] if c.get("ok"))
    lines += ["", f"Correctness vs float64 reference: {n_ok}/{len(RESULTS['correctness'])} small cases pass "
              "(rel. Frobenius error < 2e-3 fp32, 5e-3 fp16, 2e-2 bf16).", ""]
    bad = [c for c in RESULTS["correctness"] if not c.get("ok")]
    for c in bad:
        lines.append(f"- FAIL {c}")
    for note in RESULTS["notes"]:
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def main():
    RESULTS["env"] = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                          python=platform.python_version(), command=" ".join(sys.argv))
    log(RESULTS["env"])
    global CHECK_TMA
    correctness()
    if os.environ.get("CHECK_TMA", "1") == "1":
        CHECK_TMA = True
        correctness()
    run_selected(CASES, run_case, RESULTS["notes"], save)
    save()
    print(markdown())


if __name__ == "__main__":
    main()
