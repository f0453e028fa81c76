"""``attnlab bench efficiency``: CAB's efficiency length of each mechanism against softmax attention.

Paper: "CAB: Comprehensive Attention Benchmarking on Long Sequence Modeling" (paper 14). For each
registered mechanism and length N, one module (d_model 512, 8 heads as CAB; B = 1 on CPU, 4 on
CUDA) runs forward and forward + backward on random (B, N, d_model) inputs; we record the median
time and the peak memory (CUDA: allocator peak; CPU: resident-set growth sampled every millisecond,
with glibc told to return every block above 64 KiB to the OS on free, so that each call's own
peak shows).
Softmax's cost gets a quadratic fit a N^2 + b N + c, each other mechanism a linear fit (the time
fit drops the shortest length, as CAB does); the efficiency length is the positive N where the two
curves cross: beyond it the mechanism is faster (or leaner) than softmax. ``None`` means the fits
never cross at positive N (the mechanism is cheaper everywhere, or nowhere).
Writes ``efficiency_<device>.json`` / ``.md`` / ``.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..mechanisms import MECHANISMS
from .kernels import measure


@dataclass
class EfficiencyConfig:
    mechanisms: list[str] | None = None  # None: every registered mechanism
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096])
    d_model: int = 512  # CAB
    n_heads: int = 8  # CAB
    batch: int | None = None  # None: 1 on CPU, 4 on CUDA (CAB)
    causal: bool = False
    backward: bool = True  # also time forward + backward
    repeats: int = 3
    max_call_s: float = 5.0  # a mechanism slower than this per call skips its longer lengths (bounds the run)
    device: str = "cpu"
    dtype: str = "float32"
    progress: bool = True


def efficiency_length(n: list[int], base: list[float], mech: list[float], drop_first: bool) -> float | None:
    """The positive N where softmax's quadratic fit meets the mechanism's linear fit (CAB's rule).

    ``n``, ``base`` (softmax cost) and ``mech`` (mechanism cost) are per-length lists; with
    ``drop_first`` the mechanism's fit skips the shortest length. None when they never cross at N > 0,
    or with fewer than 3 lengths.
    """
    pts = [(x, b, m) for x, b, m in zip(n, base, mech) if b is not None and m is not None]
    if len(pts) < 3:
        return None
    xs, bs, ms = (np.array(v, dtype=np.float64) for v in zip(*pts))
    quad = np.polyfit(xs, bs, 2)
    lo = 1 if drop_first and len(xs) > 3 else 0
    lin = np.polyfit(xs[lo:], ms[lo:], 1)
    roots = np.roots(quad - np.concatenate([[0.0], lin]))
    real = sorted(r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r.real)) and r.real > 0)
    return float(real[-1]) if real else None  # the larger root: where softmax's N^2 overtakes for good


def _module(name: str, config: EfficiencyConfig) -> torch.nn.Module:
    dtype = getattr(torch, config.dtype)
    return MECHANISMS[name](config.d_model, config.n_heads, causal=config.causal).to(config.device, dtype)


def measure_mechanism(name: str, n: int, config: EfficiencyConfig) -> dict:
    """Time and memory of one mechanism at one length; an ``error`` key when it cannot run there."""
    batch = config.batch or (4 if config.device == "cuda" else 1)
    row = dict(mechanism=name, n=n)
    try:
        torch.manual_seed(0)
        module = _module(name, config)
        x = torch.randn(batch, n, config.d_model, device=config.device, dtype=getattr(torch, config.dtype))
        xg = x.clone().requires_grad_(True)

        def forward():
            with torch.no_grad():
                return module(x)

        def forward_backward():
            module.zero_grad(set_to_none=True)
            module(xg).sum().backward()

        fns = {"fwd": forward, **({"fwd_bwd": forward_backward} if config.backward else {})}
        for key, (seconds, mib) in measure(fns, config.device, config.repeats).items():
            row[f"{key}_s"], row[f"{key}_mib"] = seconds, mib
    except Exception as e:  # e.g. a mechanism without a causal form, or out of memory at this N
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if config.device == "cuda":
            torch.cuda.empty_cache()
    return row


def _too_slow(row: dict, config: EfficiencyConfig) -> bool:
    if row["mechanism"] == "softmax":
        return False  # the baseline is needed at every length
    return any(row.get(k, 0.0) > config.max_call_s for k in ("fwd_s", "fwd_bwd_s")) or "OutOfMemory" in row.get("error", "")


def _exact_cpu_rss() -> None:
    """Make glibc hand every allocation above 64 KiB straight back to the OS when freed, so the
    resident-set sampler sees each call's own peak instead of memory cached from earlier calls
    (glibc otherwise raises its mmap threshold after the first large free)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: the sampler stays approximate
        pass


def run(config: EfficiencyConfig) -> tuple[list[dict], list[dict]]:
    """(rows per mechanism and length, one summary per mechanism with its efficiency lengths)."""
    from tqdm.auto import tqdm

    if config.device == "cpu":
        _exact_cpu_rss()
    names = config.mechanisms or list(MECHANISMS)
    unknown = [m for m in names if m not in MECHANISMS]
    if unknown:
        raise ValueError(f"`mechanisms` has unregistered names {unknown}; registered: {sorted(MECHANISMS)}")
    names = ["softmax"] + [m for m in names if m != "softmax"]
    rows, skip = [], set()
    for m, n in tqdm([(m, n) for m in names for n in config.lengths], desc="bench efficiency", disable=not config.progress):
        if m in skip:  # it ran out of memory or past max_call_s at a shorter length
            rows.append(dict(mechanism=m, n=n, error=f"skipped: too slow or out of memory at a shorter N"))
            continue
        rows.append(measure_mechanism(m, n, config))
        if _too_slow(rows[-1], config):
            skip.add(m)
    base = {r["n"]: r for r in rows if r["mechanism"] == "softmax"}
    summary = []
    for m in names[1:]:
        mine = {r["n"]: r for r in rows if r["mechanism"] == m}
        entry = dict(mechanism=m)
        for key in ("fwd_s", "fwd_bwd_s", "fwd_mib", "fwd_bwd_mib"):
            ns = [n for n in config.lengths if key in mine.get(n, {}) and key in base.get(n, {})]
            entry[key.replace("_s", "_time").replace("_mib", "_memory") + "_length"] = efficiency_length(
                ns, [base[n][key] for n in ns], [mine[n][key] for n in ns], drop_first=key.endswith("_s"))
            faster = [n for n in ns if mine[n][key] < base[n][key]]
            entry[f"{key}_measured_cheaper_from"] = min((n for n in faster if all(k in faster for k in ns if k >= n)), default=None)
        summary.append(entry)
    return rows, summary


def _num(v, unit: str = "", beyond: float | None = None) -> str:
    if v is None:
        return "-"
    text = f"{v:,.0f}{unit}" if abs(v) >= 100 else f"{v:.3g}{unit}"
    return text + "*" if beyond is not None and v > beyond else text


def markdown(rows: list[dict], summary: list[dict], config: EfficiencyConfig, command: str) -> str:
    batch = config.batch or (4 if config.device == "cuda" else 1)
    out = ["# attnlab bench efficiency (CAB efficiency length)", "", f"Command: `{command}`", "",
           f"{config.device}, {config.dtype}, B={batch}, d_model={config.d_model}, {config.n_heads} heads, "
           f"causal={config.causal}, median of {config.repeats}. Efficiency length: where softmax's quadratic fit "
           "meets the mechanism's linear fit (CAB, paper 14); 'cheaper from' is the shortest measured N from which "
           "the mechanism is measured cheaper at every longer N. * = extrapolated beyond the longest measured N; "
           "'-' = the fits never cross (cheaper everywhere, if the raw rows agree).", "",
           "| mechanism | time length fwd | fwd+bwd | memory length fwd | fwd+bwd | measured faster from (fwd / fwd+bwd) |",
           "|---|---|---|---|---|---|"]
    top = max(config.lengths)
    for s in summary:
        out.append(f"| {s['mechanism']} | {_num(s['fwd_time_length'], beyond=top)} | {_num(s['fwd_bwd_time_length'], beyond=top)} | "
                   f"{_num(s['fwd_memory_length'], beyond=top)} | {_num(s['fwd_bwd_memory_length'], beyond=top)} | "
                   f"{_num(s['fwd_s_measured_cheaper_from'])} / {_num(s['fwd_bwd_s_measured_cheaper_from'])} |")
    out += ["", "## Raw (ms / MiB)", "", "| mechanism | N | fwd ms | fwd+bwd ms | fwd MiB | fwd+bwd MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['mechanism']} | {r['n']} | error: {r['error'][:80]} | | | |")
            continue
        ms = lambda k: _num(r[k] * 1e3) if r.get(k) is not None else "-"
        out.append(f"| {r['mechanism']} | {r['n']} | {ms('fwd_s')} | {ms('fwd_bwd_s')} | {_num(r.get('fwd_mib'))} | "
                   f"{_num(r.get('fwd_bwd_mib'))} |")
    return "\n".join(out) + "\n"


def figure(rows: list[dict], config: EfficiencyConfig, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("fwd_s", "fwd_bwd_s", "fwd_mib", "fwd_bwd_mib") if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for m in dict.fromkeys(r["mechanism"] for r in rows):
            pts = [(r["n"], r[key]) for r in rows if r["mechanism"] == m and r.get(key) is not None and r[key] > 0]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m, lw=2.5 if m == "softmax" else 1.2)
        ax.set(xscale="log", yscale="log", xlabel="N", title=key.replace("_s", " time (s)").replace("_mib", " memory (MiB)"))
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    config = EfficiencyConfig(device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        config.lengths, config.d_model, config.n_heads, config.repeats = [128, 256, 512, 1024], 128, 4, 2
    for name in ("mechanisms", "lengths", "d_model", "n_heads", "batch", "repeats", "dtype", "max_call_s"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    config.causal, config.backward, config.progress = args.causal, not args.no_backward, not args.no_progress
    if config.device == "cpu":
        torch.set_num_threads(args.threads or torch.get_num_threads())
    start = time.perf_counter()
    rows, summary = run(config)
    tag = f"{config.device}{'_causal' if config.causal else ''}"
    os.makedirs(args.out, exist_ok=True)
    tail = sys.argv[3:] if sys.argv[1:3] == ["bench", "efficiency"] else sys.argv[1:] if sys.argv[0].endswith("efficiency.py") else []
    command = " ".join(["attnlab bench efficiency", *map(shlex.quote, tail)])
    with open(os.path.join(args.out, f"efficiency_{tag}.json"), "w") as f:
        json.dump(dict(command=command, config=asdict(config), seconds=round(time.perf_counter() - start, 1),
                       torch=torch.__version__, threads=torch.get_num_threads(), summary=summary, rows=rows), f, indent=1)
    text = markdown(rows, summary, config, command)
    with open(os.path.join(args.out, f"efficiency_{tag}.md"), "w") as f:
        f.write(text)
    figure(rows, config, os.path.join(args.out, f"efficiency_{tag}.png"))
    print(text)
    return 0


def add_parser(subparsers) -> None:
    """Register ``attnlab bench efficiency``."""
    p = subparsers.add_parser("efficiency", help="CAB efficiency length: where each mechanism gets cheaper than softmax")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--mechanisms", nargs="+", default=None, help="registered names (default: all; softmax always)")
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--n-heads", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--max-call-s", type=float, default=None, help="skip a mechanism's longer N once one call takes longer (default 5)")
    p.add_argument("--causal", action="store_true", help="causal variants (mechanisms without one are skipped)")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--quick", action="store_true", help="d_model 128, N up to 1024: about a minute on CPU")
    p.add_argument("--out", default="benchmarks/results", help="folder for efficiency_<device>.json/.md/.png")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


if __name__ == "__main__":  # also runnable without the CLI's other subcommands: python -m attnlab.bench.efficiency
    _parser = argparse.ArgumentParser(prog="attnlab bench efficiency")
    add_parser(_parser.add_subparsers(dest="cmd", required=True))
    sys.exit(main(_parser.parse_args(["efficiency", *sys.argv[1:]])))
