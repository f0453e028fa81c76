"""H200: attnlab's fused Triton lightning-attention kernel beside causal SDPA, 1K to 64K tokens.

Paper 46's setting (Lightning Attention-2 README): B=4, H=32, D=128, bf16, forward, causal, with the
per-head ALiBi-slope decay. Rows per length: SDPA causal (``F.scaled_dot_product_attention(...,
is_causal=True)``, and through ``attnlab.attention`` with ``causal()``), the Triton kernel (decay on
and off), and the PyTorch block loop it replaces. Each time is the median of
``triton.testing.do_bench`` (CUDA events). The kernel's output is checked at every length against
the PyTorch loop run in float32 on the same (bf16-rounded) inputs.

First a sweep of tile configurations at the lengths in SWEEP_N (env, default 1024 4096 16384); the
table then uses the fastest at 4K (or CONFIG="BLOCK,BLOCK_DV,warps,stages" to fix one).

Run through the device tool (OUT is the folder that comes back); the committed table came from
    PYTHONPATH=src OUT=$OUT SWEEP="64,64,4,2,0,0 64,64,4,2,0,1 64,64,4,2,1,1 64,64,4,3,0,1 32,64,4,3,0,1" \
        SMALL_BH="1,32,4096" python3 benchmarks/h200_lightning.py
(the default SWEEP is the 12-configuration sweep of h200_lightning_triton_run1.md; each .md records
its own command).
Writes $OUT/h200_lightning_triton.json and .md (the table, the sweep, the command) and prints them.
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
from attnlab import attention, causal  # noqa: E402
from attnlab.kernels.triton_lightning import default_config, lightning_forward  # noqa: E402
from attnlab.mechanisms.lightning import decay_slopes, lightning_attention  # noqa: E402

OUT = os.environ.get("OUT", "out")
os.makedirs(OUT, exist_ok=True)
B, H, D = (int(x) for x in os.environ.get("BHD", "4 32 128").split())
DEV = os.environ.get("DEVICE", "cuda")  # "cpu" with TRITON_INTERPRET=1: a smoke test of this script
LENGTHS = [int(x) for x in os.environ.get("LENGTHS", "1024 2048 4096 8192 16384 65536").split()]
SWEEP_N = [int(x) for x in os.environ.get("SWEEP_N", "1024 4096 16384").split()]
# (BLOCK, BLOCK_DV, num_warps, num_stages, e_first[, mask_in_loop=1]); SWEEP="64,64,4,2,0 64,64,4,3,0" picks others
SWEEP = [
    (64, 64, 8, 2, 0), (64, 64, 4, 2, 0), (64, 64, 8, 3, 0), (64, 128, 8, 2, 0), (64, 128, 8, 1, 0), (64, 32, 4, 2, 0),
    (64, 32, 4, 3, 0), (128, 64, 8, 2, 0), (128, 128, 8, 2, 0), (32, 64, 4, 2, 0), (32, 128, 4, 2, 0), (128, 32, 8, 2, 0),
]
if os.environ.get("SWEEP"):
    SWEEP = [tuple(int(x) for x in c.split(",")) for c in os.environ["SWEEP"].split()]
# Few heads: (B, H, N) run with BLOCK_DV 64, 32, 16 and the default (which shrinks the value tile)
SMALL_BH = [tuple(int(x) for x in c.split(",")) for c in os.environ.get("SMALL_BH", "").split()]
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def ms(fn, n):
    if DEV == "cpu":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    rep = 200 if n <= 16384 else 600  # milliseconds of repeats: enough for several calls at 64K SDPA
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(n, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    # bf16 on the GPU; float16 in the CPU smoke test (the interpreter's bf16 dot is wrong)
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float16
    return [torch.randn(B, H, n, D, device=DEV, dtype=dtype, generator=g) for _ in range(3)]


def sweep(rates) -> list[dict]:
    rows = []
    for n in SWEEP_N:
        q, k, v = inputs(n)
        ref = lightning_attention(q.float(), k.float(), v.float(), decay=rates, kernel="torch")
        for cfg in SWEEP:
            blk, bdv, w, s, ef, mil = (*cfg, 1)[:6]
            kw = dict(block=blk, block_dv=bdv, num_warps=w, num_stages=s, e_first=bool(ef), mask_in_loop=bool(mil))
            try:
                out = lightning_forward(q, k, v, rates, **kw)
                err = rel(out, ref)
                t = ms(lambda: lightning_forward(q, k, v, rates, **kw), n)
            except Exception as e:  # a config that does not fit (shared memory) is reported, not fatal
                log(f"sweep N={n} {(blk, bdv, w, s)} failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            rows.append({"n": n, "config": [blk, bdv, w, s, ef, mil], "ms": t, "rel_err": err})
            log(f"sweep N={n:6d} BLOCK={blk:3d} BLOCK_DV={bdv:3d} warps={w} stages={s} e_first={ef} mask_in_loop={mil}: "
                f"{t:8.3f} ms  err {err:.1e}")
        del q, k, v, ref
    return rows


def command() -> str:
    env = " ".join(f'{k}="{os.environ[k]}"' for k in ("SWEEP", "SWEEP_N", "SMALL_BH", "CONFIG", "LENGTHS") if k in os.environ)
    return f"PYTHONPATH=src OUT=$OUT {env} python3 benchmarks/h200_lightning.py".replace("  ", " ")


def small_bh() -> list[dict]:
    rows = []
    for b, h, n in SMALL_BH:
        g = torch.Generator(device=DEV).manual_seed(1)
        q, k, v = (torch.randn(b, h, n, D, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(3))
        rates = decay_slopes(h)
        sdpa = ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), n)
        for bdv in (64, 32, 16, None):
            t = ms(lambda: lightning_forward(q, k, v, rates, block_dv=bdv), n)
            name = bdv or f"default ({default_config(n, D, D, q.dtype, b * h, 132)['BLOCK_DV']})"
            rows.append({"b": b, "h": h, "n": n, "block_dv": name, "ms": t, "speedup_vs_sdpa": sdpa / t})
            log(f"few heads B={b} H={h} N={n} BLOCK_DV={name}: {t:.3f} ms (SDPA {sdpa:.3f})")
    return rows


def main() -> None:
    rates = decay_slopes(H)
    res = {"env": {"gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter smoke test)", "torch": torch.__version__,
                   "triton": __import__("triton").__version__},
           "shape": f"B={B} H={H} D={D} {inputs(1)[0].dtype}".replace("torch.", ""), "default_config": default_config(4096, D, D, torch.bfloat16, B * H, 132)}
    if os.environ.get("CONFIG"):
        best = [int(x) for x in os.environ["CONFIG"].split(",")]
        res["sweep"] = []
    else:
        res["sweep"] = sweep(rates)
        at4k = [r for r in res["sweep"] if r["n"] == 4096] or res["sweep"]
        best = min(at4k, key=lambda r: r["ms"])["config"]
    res["config"] = best
    blk, bdv, w, s, ef, mil = (*best, 1)[:6]
    log(f"table config BLOCK={blk} BLOCK_DV={bdv} warps={w} stages={s} e_first={ef} mask_in_loop={mil}")
    kw = dict(block=blk, block_dv=bdv, num_warps=w, num_stages=s, e_first=bool(ef), mask_in_loop=bool(mil))
    res["small_bh"] = small_bh()
    rows = []
    for n in LENGTHS:
        q, k, v = inputs(n, seed=n)
        ref = lightning_attention(q.float(), k.float(), v.float(), decay=rates, kernel="torch")
        got = lightning_forward(q, k, v, rates, **kw)
        err = rel(got, ref)
        del ref, got
        fns = {
            "sdpa causal (F.sdpa is_causal)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "sdpa causal (attnlab.attention)": lambda: attention(q, k, v, pattern=causal()),
            "lightning triton (decay)": lambda: lightning_forward(q, k, v, rates, **kw),
            "lightning triton (no decay)": lambda: lightning_forward(q, k, v, None, **kw),
            "lightning triton (default config, decay)": lambda: lightning_forward(q, k, v, rates),
            "lightning torch loop (decay)": lambda: lightning_attention(q, k, v, decay=rates, block=256, kernel="torch"),
        }
        times = {}
        for name, fn in fns.items():
            times[name] = ms(fn, n)
        sdpa = times["sdpa causal (F.sdpa is_causal)"]
        for name, t in times.items():
            rows.append({"n": n, "name": name, "ms": t, "us_per_token": t / n * 1e3, "speedup_vs_sdpa": sdpa / t,
                         "rel_err_vs_fp32_loop": err if name == "lightning triton (decay)" else None})
        log(f"N={n:6d} " + "  ".join(f"{k.split(' (')[0][:9]}:{t:8.3f}" for k, t in times.items()) + f"  err {err:.1e}")
        del q, k, v
        if DEV == "cuda":
            torch.cuda.empty_cache()
    res["rows"] = rows
    tri = [r for r in rows if r["name"] == "lightning triton (decay)"]
    upt = [r["us_per_token"] for r in tri]
    res["flatness_max_over_min_us_per_token"] = max(upt) / min(upt)
    faster = [r["n"] for r in tri if r["speedup_vs_sdpa"] > 1]
    res["shortest_length_faster_than_sdpa"] = min(faster) if faster else None
    with open(os.path.join(OUT, "h200_lightning_triton.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# Lightning attention: fused Triton kernel vs causal SDPA ({res['env']['gpu']}, {res['shape']}, forward)", "",
             f"Command: `{command()}` (through the device tool); "
             f"torch {res['env']['torch']}, triton {res['env']['triton']}. Median of triton.testing.do_bench (CUDA events). "
             f"Kernel config (fastest at 4K in the sweep below): BLOCK={blk}, BLOCK_DV={bdv}, num_warps={w}, num_stages={s}, "
             f"e_first={ef}, mask_in_loop={mil}; default config at this shape: {res['default_config']}.", "",
             "| N | path | ms | us/token | vs SDPA causal (F.sdpa) | rel. err vs fp32 loop |", "|---|---|---|---|---|---|"]
    for r in rows:
        e = "-" if r["rel_err_vs_fp32_loop"] is None else f"{r['rel_err_vs_fp32_loop']:.1e}"
        lines.append(f"| {r['n']} | {r['name']} | {r['ms']:.3f} | {r['us_per_token']:.4f} | {r['speedup_vs_sdpa']:.2f}x | {e} |")
    lines += ["", f"Time per token of the kernel (decay), max / min over {LENGTHS[0]}..{LENGTHS[-1]}: "
              f"{res['flatness_max_over_min_us_per_token']:.2f}; shortest length faster than SDPA causal: "
              f"{res['shortest_length_faster_than_sdpa']}."]
    if res["sweep"]:
        lines += ["", "## Sweep (decay on)", "", "| N | BLOCK | BLOCK_DV | warps | stages | e_first | mask_in_loop | ms | rel. err |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(str(x) for x in [r["n"], *r["config"]]) + f" | {r['ms']:.3f} | {r['rel_err']:.1e} |"
                  for r in res["sweep"]]
    if res["small_bh"]:
        lines += ["", "## Few heads: value-tile width (decay on; more, narrower tiles = more programs)", "",
                  "| B | H | N | BLOCK_DV | ms | vs SDPA causal |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['b']} | {r['h']} | {r['n']} | {r['block_dv']} | {r['ms']:.3f} | {r['speedup_vs_sdpa']:.2f}x |"
                  for r in res["small_bh"]]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(OUT, "h200_lightning_triton.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
