"""``attnlab bench kernels``: attnlab's attention paths against dense SDPA and plain FlexAttention.

For each case (dense, causal, 1-D sliding window, 1/2/3-D neighborhood, tile-aligned strided
neighborhood, HaloNet blocked) and each length, it times attnlab's call and, where it applies, the
plain-FlexAttention peer (the pattern's mask_mod in row-major token order through
``create_block_mask`` and compiled ``flex_attention``: what a FlexAttention user would write), and
reports:

- ``time_s``: median of ``repeats`` timed calls after one warm-up call (compilation happens there),
  with ``torch.cuda.synchronize()`` after each call on GPU;
- ``peak_mib``: CUDA: ``max_memory_allocated`` during one call minus the memory before it. CPU:
  the growth of the process's resident set size during one call, sampled every millisecond by a
  thread (approximate; it sees what the allocator takes from the OS, not cached reuse);
- ``element_density``: allowed (query, key) pairs / (Nq * Nk); ``block_density``: the fraction of
  128 x 128 tiles (FlexAttention) or of the dense work (banded path) the kernel visits;
- ``speedup``: dense SDPA time / this time, with dense SDPA timed again in every case, interleaved
  with the case's calls (robust to a change of machine load); ``frac_ideal``: speedup / (1 /
  element density).

Shapes: B=1, 16 heads, head dim 128; float32 on CPU, bfloat16 on CUDA (``--dtype`` overrides).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..core.patterns import blocked, causal, neighborhood, sliding_window
from ..kernels import attention, choose_kernel
from ..kernels import banded as banded_mod
from ..kernels import flex as flex_mod
from ..kernels import gluon_local as gluon_mod
from ..kernels import grouped_dense as grouped_mod

HEADS, HEAD_DIM = 16, 128


@dataclass
class Row:
    case: str
    impl: str
    n: int
    kernel: str
    time_s: float | None
    peak_mib: float | None
    element_density: float
    block_density: float | None
    speedup: float | None = None
    frac_ideal: float | None = None
    note: str = ""


# ---- measurement ----------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_cpu_mib(fn: Callable[[], object]) -> float | None:
    """Resident-set growth during one call, sampled every millisecond (None off Linux)."""
    try:
        base = _rss_bytes()
    except (OSError, ValueError):
        return None
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out = fn()
    peak[0] = max(peak[0], _rss_bytes())
    done.set()
    t.join()
    del out
    return (peak[0] - base) / 2**20


def _peak_cuda_mib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def measure(fns: dict[str, Callable[[], object]], device: str, repeats: int) -> dict[str, tuple[float, float | None]]:
    """{name: (median seconds, peak MiB)}: one warm-up call each (compiles, builds caches), then
    ``repeats`` rounds that time every function once, interleaved, so that a change of machine load
    hits all of them alike; then one call each for peak memory."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in fns.values():
        fn()
        sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn, sync))
    peak = {name: (_peak_cuda_mib(fn) if device == "cuda" else _peak_cpu_mib(fn)) for name, fn in fns.items()}
    return {name: (statistics.median(times[name]), peak[name]) for name in fns}


# ---- cases ----------------------------------------------------------------------------------------


def _grid(n: int, dims: int) -> tuple[int, ...] | None:
    """A power-of-two grid of n tokens with axes as equal as possible (n must be a power of two)."""
    if n & (n - 1):
        return None
    e = n.bit_length() - 1
    return tuple(2 ** (e // dims + (1 if i >= dims - e % dims else 0)) for i in range(dims))


def cases(n: int, device: str) -> list[tuple[str, object]]:
    """(name, pattern) for one length. The 1-D window is 257 on CPU (the issue's target) and N/16 + 1 on GPU."""
    window = 257 if device == "cpu" else n // 16 + 1
    out: list[tuple[str, object]] = [
        ("dense", None),
        ("causal", causal()),
        (f"window {window}", sliding_window(window)),
        (f"nbhd1d k={window}", neighborhood((n,), window)),
    ]
    g2, g3 = _grid(n, 2), _grid(n, 3)
    if g2 is not None and min(g2) >= 32:
        k2 = tuple(s // 4 + 1 for s in g2)
        out.append((f"nbhd2d {g2[0]}x{g2[1]} k={k2[0]}x{k2[1]}", neighborhood(g2, k2)))
        kb = (16, 32)  # 2 x 2 tiles of 8 x 16: queries of a stride group see whole key tiles
        out.append((f"strided2d {g2[0]}x{g2[1]} k=s={kb[0]}x{kb[1]}", neighborhood(g2, kb, stride=kb, tile_shape=(8, 16))))
        out.append((f"blocked2d {g2[0]}x{g2[1]} b=8x16 halo=4x8", blocked(g2, (8, 16), (4, 8), tile_shape=(8, 16))))
    if g3 is not None and min(g3) >= 8:
        k3 = tuple(s // 4 + 1 for s in g3)
        out.append((f"nbhd3d {'x'.join(map(str, g3))} k={'x'.join(map(str, k3))}", neighborhood(g3, k3)))
    return out


def _block_density(kernel: str, pattern, n: int, device) -> float | None:
    if pattern is None:
        return 1.0
    if kernel == "banded":
        return banded_mod.plan(pattern, n, n, device, max_work=float("inf")).work
    if kernel == "flex":
        order = flex_mod.token_order(pattern, n, n, device)
        return (pattern.permuted() if order is not None else pattern).block_layout(n, n).density
    if kernel == "triton":
        return None
    if kernel == "gluon":  # pairs in the visited key boxes, masked or not
        return gluon_mod.cached_route(pattern, n, n, device).pairs / (n * n)
    if kernel == "grouped":  # computes exactly the pattern's pairs: no partial blocks
        return grouped_mod.cached_plan(pattern, n, n).pairs / (n * n)
    return pattern.block_layout(n, n).density


def _flex_peer(pattern, n: int, device: str) -> Callable:
    """Plain FlexAttention: the mask_mod over row-major tokens, create_block_mask, compiled flex."""
    from torch.nn.attention.flex_attention import create_block_mask

    bm = create_block_mask(pattern.mask_mod(n, n, device), None, None, n, n, device=device)
    fn = flex_mod.compiled_flex()
    return lambda q, k, v: fn(q, k, v, block_mask=bm)


def run(lengths: list[int], device: str, dtype: torch.dtype, quick: bool, repeats: int, progress: bool = True) -> list[Row]:
    """Measure every case at every length; rows in table order. Each case times dense SDPA again,
    interleaved with its own calls, and its speedups are over that time."""
    from tqdm import tqdm

    plan = [(n, name, p) for n in lengths for name, p in cases(n, device)]
    rows: list[Row] = []
    bar = tqdm(plan, desc="bench kernels", disable=not progress, leave=False)
    for n, name, pattern in bar:
        bar.set_postfix_str(f"N={n} {name}")
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device=device, dtype=dtype, generator=g) for _ in range(3))
        rows += _case(name, pattern, q, k, v, device, quick, repeats)
        del q, k, v
    return rows


def _case(name, pattern, q, k, v, device, quick, repeats) -> list[Row]:
    n = q.shape[2]
    density = 1.0 if pattern is None else pattern.density(n, n)
    kernel = choose_kernel(q, k, pattern)
    impls: list[tuple[str, str, Callable | None]] = [
        ("sdpa", "sdpa", lambda: F.scaled_dot_product_attention(q, k, v)),
        ("attnlab", kernel, lambda: attention(q, k, v, pattern=pattern)),
    ]
    compiles = pattern is not None and not isinstance(pattern, type(causal()))
    if compiles and kernel != "flex":
        impls.append(("attnlab flex", "flex", lambda: attention(q, k, v, pattern=pattern, kernel="flex")))
    if compiles:
        impls.append(("flex peer", "flex row-major", None))
    rows, fns = [], {}
    for impl, kern, fn in impls:
        row = Row(name, impl, n, kern, None, None, density, None)
        row.block_density = pattern.block_layout(n, n).density if fn is None else _block_density(kern, pattern, n, q.device)
        if quick and kern.startswith("flex"):
            row.note = "skipped (--quick: compiling FlexAttention costs ~20 s per pattern on CPU)"
        else:
            try:
                if fn is None:
                    peer = _flex_peer(pattern, n, device)
                    fn = lambda peer=peer: peer(q, k, v)  # noqa: E731
                fn()  # fails here, not inside the timing loop
                fns[impl] = fn
            except Exception as e:  # a failing peer or path is reported, not fatal to the run
                row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        rows.append(row)
    results = measure(fns, device, repeats)
    dense = results["sdpa"][0]
    for row in rows:
        if row.impl in results:
            row.time_s, row.peak_mib = results[row.impl]
            row.speedup = dense / row.time_s
            row.frac_ideal = row.speedup * row.element_density
    # The dense SDPA baseline is shown once, in the dense case; other cases use it for speedups only.
    return rows if pattern is None else [r for r in rows if r.impl != "sdpa"]


# ---- output ---------------------------------------------------------------------------------------


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows: list[Row]) -> str:
    """A Markdown table of the rows."""
    head = "| N | case | impl | kernel | time (ms) | peak MiB | elem dens | block dens | speedup | frac ideal | note |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        t = None if r.time_s is None else r.time_s * 1e3
        lines.append(
            f"| {r.n} | {r.case} | {r.impl} | {r.kernel} | {_fmt(t, '.1f')} | {_fmt(r.peak_mib, '.0f')} | "
            f"{r.element_density:.4f} | {_fmt(r.block_density, '.4f')} | {_fmt(r.speedup, '.2f')} | "
            f"{_fmt(r.frac_ideal, '.2f')} | {r.note} |"
        )
    return "\n".join(lines)


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    try:
        env["loadavg_before"] = os.getloadavg()
    except OSError:
        pass
    return env


def main(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    lengths = args.lengths or ([2048] if args.quick else ([8192] if device == "cpu" else [8192, 32768]))
    repeats = args.repeats or (2 if args.quick else 3)
    env = environment(device)
    t0 = time.time()
    rows = run(lengths, device, dtype, args.quick, repeats, progress=not args.no_progress)
    env["loadavg_after"] = os.getloadavg()
    env["wall_s"] = round(time.time() - t0, 1)
    print(f"attnlab bench kernels: device={device} dtype={dtype} B=1 H={HEADS} D={HEAD_DIM} repeats={repeats}")
    print(table(rows))
    if args.json:
        payload = {
            "device": device,
            "dtype": str(dtype),
            "shape": {"B": 1, "H": HEADS, "D": HEAD_DIM},
            "repeats": repeats,
            "quick": args.quick,
            "environment": env,
            "rows": [asdict(r) for r in rows],
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def add_parser(subparsers) -> None:
    """Register ``attnlab bench kernels``."""
    p = subparsers.add_parser("kernels", help="time attnlab's attention kernels against SDPA and FlexAttention")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths N (Nq = Nk)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--quick", action="store_true", help="N=2048, no FlexAttention compiles: < 1 min on 2 CPU cores")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 3; 2 with --quick)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)
