"""H200: where the Gluon kernel loses on short work items (issue 2's HaloNet case: 7.5 key tiles per query tile).

1. Dense attention at N = 1024 ... 16384 with B = 16384 / N (the same 2048 work items of 128 queries, N / 128
   key tiles each): SDPA (default backend and FlashAttention-2), the Gluon kernel and the Triton local kernel,
   each as a fraction of SDPA's per-pair rate at N = 16384. This is the per-item overhead of each kernel.
2. HaloNet (128x128, block 16, halo 8) on the Gluon route as the dispatcher runs it (masked, for the edge
   blocks), with the mask compiled out (timing only: the edge blocks' outputs are then wrong) and with each
   key tile shape forced, one program per item and a persistent grid.

    OUT=outdir python3 benchmarks/h200_gluon_items.py   # writes outdir/items.json
    ITEMS_N=256,512,16384 ITEMS_HALONET=0 ...           # other lengths (the last one is the rate's reference)
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from attnlab.core.patterns import blocked, sliding_window  # noqa: E402
from attnlab.kernels import gluon_local as gk  # noqa: E402
from attnlab.kernels import triton_local as tlo  # noqa: E402

OUT = os.environ.get("OUT", "out")
os.makedirs(OUT, exist_ok=True)
H, D, DT, TOKENS = 16, 128, torch.bfloat16, 16384
SMS = torch.cuda.get_device_properties(0).multi_processor_count


def ms(fn):
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def qkv(b, n):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(b, H, n, D, device="cuda", dtype=DT, generator=g) for _ in range(3)]


def sdpa(q, k, v, backend=None):
    if backend is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel(backend):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def main():
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dense": [], "halonet": {}}
    for n in [int(x) for x in os.environ.get("ITEMS_N", "1024,2048,4096,16384").split(",")]:
        q, k, v = qkv(TOKENS // n, n)
        p = sliding_window(2 * n)
        route = gk.cached_route(p, n, n, q.device)
        qt, kt, w = tlo._route(p, n, n, D, q.device)
        opts = {**tlo.default_options(tlo.cached_plan(p, n, n, qt, kt, q.device), w), "dense_core": False}
        row = {"n": n, "b": TOKENS // n,
               "sdpa_ms": ms(lambda: sdpa(q, k, v)),
               "sdpa_flash_ms": ms(lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION)),
               "gluon_ms": ms(lambda: gk.local_attention(q, k, v, route, programs=SMS)),
               "triton_ms": ms(lambda: tlo.attention(q, k, v, p, q_tile=qt, kv_tile=kt, num_warps=w, options=opts))}
        res["dense"].append(row)
        print(row, flush=True)
        del q, k, v
    for row in res["dense"]:  # TOKENS rows of n keys each, at SDPA's per-pair rate at N = 16K
        ideal = res["dense"][-1]["sdpa_ms"] * row["n"] / TOKENS
        row["frac_of_16k_rate"] = {k[:-3]: ideal / row[k] for k in row if k.endswith("_ms")}
        print(row["n"], {k: round(f, 3) for k, f in row["frac_of_16k_rate"].items()}, flush=True)
    if os.environ.get("ITEMS_HALONET", "1") == "0":
        json.dump(res, open(os.path.join(OUT, "items.json"), "w"), indent=1)
        return
    q, k, v = qkv(1, TOKENS)
    p = blocked((128, 128), 16, 8)
    mask = p.mask(TOKENS, TOKENS, device="cuda")
    ref = torch.nn.functional.scaled_dot_product_attention(q[:, :2], k[:, :2], v[:, :2], attn_mask=mask)
    sd = ms(lambda: sdpa(q, k, v))
    ideal_ms = sd * p.density(TOKENS, TOKENS)
    routes = {"route (masked)": gk.cached_route(p, TOKENS, TOKENS, q.device)}
    routes["mask compiled out (timing only)"] = dataclasses.replace(routes["route (masked)"], masked=False)
    kv_tiles = gk.KV_TILES[2]
    for tile in ((8, 8), (16, 8), (4, 32)):  # one key tile shape forced
        gk.KV_TILES[2] = [tile]
        gk.cached_route.cache_clear()
        routes[f"key tiles {tile}"] = gk.cached_route(p, TOKENS, TOKENS, q.device)
    gk.KV_TILES[2] = kv_tiles
    for name, r in routes.items():
        for programs in (SMS, None):
            t = ms(lambda: gk.local_attention(q, k, v, r, programs=programs))
            out = gk.local_attention(q[:, :2], k[:, :2], v[:, :2], r, programs=programs).double()
            err = ((out - ref.double()).norm() / ref.double().norm()).item()
            res["halonet"][f"{name}, programs={programs}"] = {"ms": t, "frac": ideal_ms / t, "err": err,
                                                             "masked": r.masked, "pairs": r.pairs}
            print("HaloNet", name, programs, f"{t:.3f} ms, frac {ideal_ms / t:.3f}, err {err:.1e}, masked {r.masked}, "
                  f"pairs/ideal {r.pairs / (p.density(TOKENS, TOKENS) * TOKENS ** 2):.3f}", flush=True)
    json.dump(res, open(os.path.join(OUT, "items.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
