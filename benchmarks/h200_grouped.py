"""H200: grouped dense attention (kernels/grouped_dense.py) beside dense SDPA, FlexAttention and the
Triton local kernel, on issue 2's tile-aligned strided/blocked cases (one run, same inputs).

Per case (B=1, 16 heads, D=128, bf16, forward; do_bench medians, L2 flushed):
- dense SDPA at the same N (cuDNN, torch's default pick there): the speed-up baseline;
- Triton local kernel (attnlab's route: its default tiles) and compiled FlexAttention (row-major
  for 1-D, tile-permuted tokens for 2-D, its best layout in h200_kernels.md);
- grouped dense: as attnlab.attention runs it (SDPA picks the backend), with cuDNN and flash forced,
  with the 1-D views copied to contiguous first ("copy"), and its parts: the SDPA calls alone on
  ready inputs (views for 1-D; already-gathered windows for 2-D: the floor if K/V arrived grouped);
- errors: grouped vs the Triton kernel (all heads) and vs SDPA with the dense bool mask (2 heads).
Probe, 1D window N/16 at 32K: the interior (15 of 17 key tiles per 128 queries) as cuDNN on
as_strided windows, and attnlab's banded path (whole spans, one shared mask) with 128/256-query
blocks, to see whether either beats the Triton kernel's 0.67.

Writes $OUT/h200_grouped.json and .md after every case; prints the table last.
Command: `bash benchmarks/h200_grouped.sh` (GPU tests, then this script).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import attnlab  # noqa: E402
from attnlab.core.patterns import blocked, document, neighborhood, sliding_window  # noqa: E402
from attnlab.kernels import grouped_dense as gd  # noqa: E402
from attnlab.kernels import triton_local as tlo  # noqa: E402
from bench_cases import run_selected  # noqa: E402  (benchmarks/, the script's folder)

OUT = os.environ.get("OUT", "out")
os.makedirs(OUT, exist_ok=True)
SMOKE = os.environ.get("SMOKE") == "1"  # CPU dry run of the script's logic at toy sizes (no timings)
DEV = torch.device("cpu" if SMOKE else "cuda")
H, D, DT = (2, 32, torch.float32) if SMOKE else (16, 128, torch.bfloat16)
if SMOKE:
    def do_bench(fn, warmup=0, rep=0, return_mode=""):
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
else:
    from triton.testing import do_bench
RES: dict = {"env": {}, "cases": [], "dense": {}, "probe": {}, "notes": []}
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def ms(fn, rep=120):
    return do_bench(fn, warmup=20, rep=rep, return_mode="median")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def qkv(n, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return [torch.randn(1, H, n, D, device=DEV, dtype=DT, generator=g) for _ in range(3)]


def dense(n):
    if n not in RES["dense"]:
        q, k, v = qkv(n, 0)
        r = {"sdpa_ms": ms(lambda: F.scaled_dot_product_attention(q, k, v), rep=300)}

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)
        timed(r, "cudnn_ms", cudnn)
        r["tflops"] = 4 * n * n * D * H / r["sdpa_ms"] / 1e9
        RES["dense"][n] = r
        log("dense", n, r)
    return RES["dense"][n]["sdpa_ms"]


def timed(row, key, fn):
    """Time fn into row[key] (ms); record the error instead if it fails."""
    try:
        fn()
        if not SMOKE:
            torch.cuda.synchronize()
        row[key] = ms(fn)
    except Exception as e:  # one variant failing must not hide the others
        row[key + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        traceback.print_exc(limit=3)
    log(" ", key, row.get(key, row.get(key + "_error")))


def grouped_parts(q, k, v, plan, scale, row):
    """The SDPA calls alone on ready inputs: views (1-D) or pre-gathered windows (n-D)."""
    if len(plan.q_grid) == 1:
        args = [(gd.fold(q, s.q_starts[0], s.q_step, s.count, s.q_len),
                 gd.fold(k, s.k_starts[0], s.k_step, s.count, s.k_len),
                 gd.fold(v, s.k_starts[0], s.k_step, s.count, s.k_len)) for (s,) in plan.classes]
    else:
        args = []
        for qidx, kidx in gd._indices(plan, q.device):
            def gather(t, idx, n):
                return t.transpose(1, 2).index_select(1, idx.flatten()).view(
                    idx.shape[0], n, H, D).transpose(1, 2)
            args.append((gather(q, qidx, qidx.shape[1]), gather(k, kidx, kidx.shape[1]), gather(v, kidx, kidx.shape[1])))
        timed(row, "grouped_gather_only_ms", lambda: [
            (t.transpose(1, 2).index_select(1, i.flatten())) for qi, ki in gd._indices(plan, q.device)
            for t, i in ((q, qi), (k, ki), (v, ki))])
    timed(row, "grouped_sdpa_only_ms", lambda: [F.scaled_dot_product_attention(*a, scale=scale) for a in args])
    big = max(args, key=lambda a: a[0].shape[0] * a[0].shape[2])
    row["largest_class"] = dict(q=list(big[0].shape), k=list(big[1].shape), k_stride=list(big[1].stride()))
    timed(row, "grouped_largest_class_sdpa_ms", lambda: F.scaled_dot_product_attention(*big, scale=scale))


def alt_gather(q, k, v, plan, scale):
    """n-D grouped dense with a contiguous gather: ``index_select`` on the token axis of (B, H, N, D)
    (whole 256-byte rows in order) and groups folded onto the batch axis, (G, B*H, L, D), the layout
    the 1-D views showed cuDNN takes. Benchmark-only variant of ``grouped_dense.run_gathered``."""
    b, hq, n, _ = q.shape
    out = torch.empty(b, hq, n, v.shape[-1], dtype=q.dtype, device=q.device)
    for qidx, kidx in gd._indices(plan, q.device):
        g, s, w = *qidx.shape, kidx.shape[1]

        def gather(t, idx, m):
            rows = t.index_select(2, idx.flatten()).view(b, t.shape[1], g, m, t.shape[3])  # (B, H, G, m, D)
            return rows.permute(2, 0, 1, 3, 4).flatten(1, 2)  # (G, B*H, m, D), a view

        res = F.scaled_dot_product_attention(gather(q, qidx, s), gather(k, kidx, w), gather(v, kidx, w), scale=scale)
        out[:, :, qidx] = res.view(g, b, hq, s, -1).permute(1, 2, 0, 3, 4)
    return out


def run_case(name, target, p, n, flex_perm):
    log("case", name)
    row = dict(case=name, pattern=repr(p), n=n, target=target, density=p.density(n, n))
    row["ideal"] = 1 / row["density"]
    base = dense(n)
    row["sdpa_dense_ms"] = base
    q, k, v = qkv(n, 1)
    scale = D ** -0.5
    plan = gd.cached_plan(p, n, n)
    row["classes"] = len(plan.classes)
    row["mean_group"] = plan.mean_group
    timed(row, "grouped_ms", lambda: attnlab.attention(q, k, v, pattern=p, kernel="grouped"))
    for be_name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        def f(be=be):
            with sdpa_kernel(be):
                return gd.grouped_dense(q, k, v, plan, scale)
        timed(row, f"grouped_{be_name}_ms", f)
    if len(plan.q_grid) == 1:
        timed(row, "grouped_copy_ms", lambda: gd.grouped_dense(q, k, v, plan, scale, copy_views=True))
    else:
        timed(row, "grouped_alt_gather_ms", lambda: alt_gather(q, k, v, plan, scale))
        row["alt_gather_err_vs_grouped"] = rel(alt_gather(q, k, v, plan, scale), gd.grouped_dense(q, k, v, plan, scale))
    grouped_parts(q, k, v, plan, scale, row)
    timed(row, "triton_ms", lambda: tlo.run_pattern(q, k, v, p, scale))
    row["triton_tiles"] = repr(tlo._route(p, n, n, D, DEV))
    if os.environ.get("FLEX", "1") == "1":
        try:
            from attnlab.kernels import flex as FX

            fx = FX.compiled_flex()
            if flex_perm:
                pp, order = p.permuted(), p.token_order(n, n).to(DEV)
                qp, kp, vp = q[:, :, order], k[:, :, order], v[:, :, order]
                bm = FX.block_mask(pp, n, n, DEV)
                timed(row, "flex_ms", lambda: fx(qp, kp, vp, block_mask=bm))
                row["flex_layout"] = "tile-permuted tokens (permutation not timed)"
            else:
                bm = FX.block_mask(p, n, n, DEV)
                timed(row, "flex_ms", lambda: fx(q, k, v, block_mask=bm))
                row["flex_layout"] = "row-major"
        except Exception as e:
            row["flex_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    out = attnlab.attention(q, k, v, pattern=p, kernel="grouped")
    row["finite"] = bool(torch.isfinite(out).all())
    try:
        row["err_vs_triton"] = rel(out, tlo.run_pattern(q, k, v, p, scale))
    except Exception as e:
        row["check_triton_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    try:
        mask = p.mask(n, n, device=DEV)
        ref = F.scaled_dot_product_attention(q[:, :2], k[:, :2], v[:, :2], attn_mask=mask)
        row["err_vs_sdpa_mask"] = rel(out[:, :2], ref)
        del mask, ref
    except Exception as e:
        row["check_mask_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    for key in [x for x in row if x.endswith("_ms") and x != "sdpa_dense_ms"]:
        row[key.replace("_ms", "_frac")] = base / row[key] / row["ideal"]
    RES["cases"].append(row)
    save()
    if not SMOKE:
        torch.cuda.empty_cache()


def probe_window():
    """1D window N/16 at 32K, two ways around the Triton kernel's 0.67:
    (a) the mask-free interior (keys [128c - 896, 128c + 1024) of query chunk c) as cuDNN over
        as_strided windows, plus one edge tile per chunk unmasked (a bound for a log-sum-exp split);
    (b) attnlab's banded path (kernels/banded.py) with 128/256-query blocks: one SDPA over each
        block's whole key span (17 tiles of 128 for 128 queries) with one shared additive mask,
        border blocks gathered; exact, so its output is checked against the Triton kernel."""
    from attnlab.kernels import banded as BD

    n, w = (4096, 256) if SMOKE else (32768, 2048)
    q, k, v = qkv(n, 2)
    p = sliding_window(w)
    r = {"density": p.density(n, n)}
    r["ideal_ms"] = dense(n) * r["density"]
    half = w // 2
    c0, c1 = half // 128, n // 128 - half // 128  # chunks whose window lies inside the sequence
    cnt = c1 - c0
    qi = gd.fold(q, c0 * 128, 128, cnt, 128)
    ki = gd.fold(k, c0 * 128 - (half - 128), 128, cnt, w - 128)
    vi = gd.fold(v, c0 * 128 - (half - 128), 128, cnt, w - 128)
    timed(r, "interior_cudnn_ms", lambda: F.scaled_dot_product_attention(qi, ki, vi))
    ke = gd.fold(k, c0 * 128 - half, 128, cnt, 128)
    ve = gd.fold(v, c0 * 128 - half, 128, cnt, 128)
    timed(r, "one_edge_tile_sdpa_ms", lambda: F.scaled_dot_product_attention(qi, ke, ve))
    r["scale_to_all_chunks"] = (n // 128) / cnt
    timed(r, "triton_window_ms", lambda: tlo.run_pattern(q, k, v, p, D ** -0.5))
    ref = tlo.run_pattern(q, k, v, p, D ** -0.5) if not SMOKE else attnlab.attention(q, k, v, pattern=p, kernel="chunked")
    for bq in (128, 256):
        try:
            band = BD.plan(p, n, n, DEV, bq=bq, max_work=float("inf"))
            r[f"banded{bq}_span"] = band.span
            r[f"banded{bq}_strided_fraction"] = band.strided_fraction
            timed(r, f"banded{bq}_ms", lambda: BD.banded(q, k, v, p, D ** -0.5, band))
            r[f"banded{bq}_err_vs_triton"] = rel(BD.banded(q, k, v, p, D ** -0.5, band), ref)
            if bq == 128:
                for be_name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
                    def f(be=be):
                        with sdpa_kernel(be):
                            return BD.banded(q, k, v, p, D ** -0.5, band)
                    timed(r, f"banded{bq}_{be_name}_ms", f)
        except Exception as e:
            r[f"banded{bq}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc(limit=3)
    for key in [x for x in r if x.endswith("_ms") and x != "ideal_ms"]:
        r[key.replace("_ms", "_frac")] = r["ideal_ms"] / r[key]
    RES["probe"] = r
    save()


ROUTES = [
    ("documents 4 x 8192", document([8192] * 4), 32768),
    ("documents 5000/9000/3000/15768", document([5000, 9000, 3000, 15768]), 32768),
    ("1D HaloNet N=32K block 256 halo 128", blocked(32768, 256, 128), 32768),
    ("1D strided N=32K k=4096 s=512", neighborhood(32768, 4096, stride=512), 32768),
    ("1D strided N=8K k=1024 s=64", neighborhood(8192, 1024, stride=64), 8192),
    ("1D strided N=4K k=512 s=128", neighborhood(4096, 512, stride=128), 4096),
]


def routes():
    """The 1-D patterns that attnlab.attention now sends to grouped dense on CUDA, vs the Triton kernel."""
    out = []
    for name, p, n in ROUTES:
        r = dict(case=name, n=n, density=p.density(n, n))
        try:
            base = dense(n)
            q, k, v = qkv(n, 3)
            from attnlab.kernels import choose_kernel

            r["auto_kernel"] = choose_kernel(q, k, p)
            timed(r, "auto_ms", lambda: attnlab.attention(q, k, v, pattern=p))
            timed(r, "triton_ms", lambda: tlo.run_pattern(q, k, v, p, D ** -0.5))
            for key in ("auto", "triton"):
                if r.get(key + "_ms"):
                    r[key + "_frac"] = base / r[key + "_ms"] * r["density"]
            r["err_vs_triton"] = rel(attnlab.attention(q, k, v, pattern=p), tlo.run_pattern(q, k, v, p, D ** -0.5))
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc(limit=3)
        out.append(r)
        RES["routes"] = out
        save()


def fmt(x, nd=3):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def markdown() -> str:
    e = RES["env"]
    lines = [
        "# H200: grouped dense attention (cuDNN on grouped keys) vs the Triton local kernel, FlexAttention, SDPA",
        "",
        f"{e.get('gpu')}, torch {e.get('torch')}, cuDNN {e.get('cudnn')}; B=1, {H} heads, D={D}, bf16, forward; "
        "do_bench medians (ms) and, in brackets, the fraction of the ideal speed-up (1/density) over dense SDPA.",
        "",
        "| case | ideal | SDPA dense | grouped (attnlab.attention) | grouped cuDNN | grouped flash | grouped, views copied | "
        "SDPA calls alone | gather alone | Triton local | Flex | target | err vs Triton | err vs SDPA-mask |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(r, key):
        return f"{fmt(r.get(key + '_ms'))} ({fmt(r.get(key + '_frac'), 2)})" if r.get(key + "_ms") else "-"

    for r in RES["cases"]:
        met = r.get("grouped_frac")
        lines.append(
            f"| {r['case']} | {r['ideal']:.1f} | {fmt(r['sdpa_dense_ms'])} | {cell(r, 'grouped')} | {cell(r, 'grouped_cudnn')} "
            f"| {cell(r, 'grouped_flash')} | {cell(r, 'grouped_copy')} | {cell(r, 'grouped_sdpa_only')} "
            f"| {fmt(r.get('grouped_gather_only_ms'))} | {cell(r, 'triton')} | {cell(r, 'flex')} "
            f"| {r['target']} {'met' if met and met >= r['target'] else 'NOT met'} "
            f"| {fmt(r.get('err_vs_triton'), 4)} | {fmt(r.get('err_vs_sdpa_mask'), 4)} |")
    lines += ["", "Dense SDPA: " + ", ".join(f"N={n}: {fmt(r['sdpa_ms'])} ms ({r['tflops']:.0f} TFLOP/s), "
                                              f"cuDNN forced {fmt(r.get('cudnn_ms'))} ms" for n, r in RES["dense"].items())]
    if RES["probe"]:
        lines += ["", f"Probe, 1D window N/16 at 32K: {json.dumps({a: (round(b, 4) if isinstance(b, float) else b) for a, b in RES['probe'].items()})}"]
    for r in RES["cases"]:
        lines.append(f"- {r['case']}: classes {r['classes']}, mean group {r['mean_group']:.0f}, largest class "
                     f"{r.get('largest_class')}, its SDPA alone {fmt(r.get('grouped_largest_class_sdpa_ms'))} ms, "
                     f"Triton tiles {r.get('triton_tiles')}, flex {r.get('flex_layout', r.get('flex_error'))}")
        for key in [x for x in r if x.endswith("_error")]:
            lines.append(f"  - {key}: {r[key]}")
    if RES.get("routes"):
        lines += ["", "1-D patterns routed to grouped dense on CUDA (attnlab.attention auto) vs the Triton local kernel:", "",
                  "| case | density | auto kernel | auto ms (frac) | Triton ms (frac) | err |", "|---|---|---|---|---|---|"]
        for r in RES["routes"]:
            lines.append(f"| {r['case']} | {r['density']:.4f} | {r.get('auto_kernel')} | {fmt(r.get('auto_ms'))} "
                         f"({fmt(r.get('auto_frac'), 2)}) | {fmt(r.get('triton_ms'))} ({fmt(r.get('triton_frac'), 2)}) "
                         f"| {fmt(r.get('err_vs_triton'), 4)} {r.get('error', '')} |")
    for r in RES["cases"]:
        if r.get("grouped_alt_gather_ms"):
            lines.append(f"- {r['case']}: contiguous-gather variant {fmt(r['grouped_alt_gather_ms'])} ms "
                         f"({fmt(r.get('grouped_alt_gather_frac'), 2)}), same output (rel {fmt(r.get('alt_gather_err_vs_grouped'), 6)})")
    lines += [f"- note: {x}" for x in RES["notes"]]
    lines.append(f"- SDPA refused the copy-free 1-D views: {RES.get('views_refused') or 'never'}")
    return "\n".join(lines) + "\n"


def save():
    RES["views_refused"] = {repr(a): b for a, b in gd._views_refused.items()}
    with open(os.path.join(OUT, "h200_grouped.json"), "w") as f:
        json.dump(RES, f, indent=1, default=str)
    with open(os.path.join(OUT, "h200_grouped.md"), "w") as f:
        f.write(markdown())


CASES = [
    ("1D strided NA N=32K k=2048 s=256 (tile-aligned)", 0.80, neighborhood(32768, 2048, stride=256), 32768, False),
    ("2D strided NA 128x128 k=48 s=16 (tile-aligned)", 0.80, neighborhood((128, 128), 48, stride=16), 16384, True),
    ("2D blocked 128x128 block 16 halo 8 (HaloNet)", 0.80, blocked((128, 128), 16, 8), 16384, True),
]


if SMOKE:
    ROUTES = [("documents smoke", document([300, 700, 1024]), 2024), ("1D strided smoke", neighborhood(2048, 256, stride=64), 2048)]
    CASES = [("1D smoke", 0.8, neighborhood(1024, 256, stride=64), 1024, False),
             ("2D smoke", 0.8, neighborhood((32, 32), 12, stride=4), 1024, True),
             ("blocked smoke", 0.8, blocked((32, 32), 8, 4), 1024, True)]


def main():
    RES["env"] = dict(gpu=torch.cuda.get_device_name() if not SMOKE else "cpu smoke", torch=torch.__version__,
                      cudnn=torch.backends.cudnn.version(), command=" ".join(sys.argv))
    log(RES["env"])
    run_selected(CASES, run_case, RES["notes"], save)
    if os.environ.get("ROUTE", "1") == "1":
        routes()
    if os.environ.get("PROBE", "1") == "1":
        try:
            probe_window()
        except Exception as e:
            RES["notes"].append(f"probe failed: {type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc()
    save()
    print(markdown())


if __name__ == "__main__":
    main()
