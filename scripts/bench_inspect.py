"""Time and peak memory of `attnlab inspect` against one plain forward pass and against eager attention maps.

Each mode runs in its own process on SmolLM2 and the shipped KJV text, cut to --tokens tokens:
    plain   model(input_ids) with SDPA, no observers (what a forward costs);
    inspect every diagnostic of `attnlab inspect` except head ablation (run_diagnostics: the
            attached pass over the text, with thumbnails, plus its short induction-probe pass);
    eager   model(input_ids, output_attentions=True) with eager attention: every layer's (H, N, N) map.
Peak memory is the process's resident-set high-water mark (VmHWM) during the measured work only: the
mark is reset (``/proc/self/clear_refs`` = 5) after the model is loaded and warmed up, so loading does
not count. Timings are the best of --repeat runs; ``cpu_seconds`` is the process CPU time (user + system)
of the best-CPU run, steadier than wall time when other jobs share the cores (use --threads 1 to compare
code versions on a loaded machine).

    python3 scripts/bench_inspect.py --tokens 4096 --modes plain,inspect,eager --out benchmarks/results/inspect_memory_time.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(mode: str, tokens: int, repeat: int, chunk: int, threads: int | None = None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)

    from attnlab.report import inspect as ins

    model, tokenizer = ins.load_model("smollm2")
    if mode == "eager":
        # ~18 GB at 4,096 tokens: if memory runs out, the kernel should kill this process, not a neighbour.
        Path("/proc/self/oom_score_adj").write_text("1000")
        model.set_attn_implementation("eager")
    ids, _, _ = ins.tokenize(tokenizer, ins.default_text(), tokens, ins.context_length(model))
    assert ids.shape[1] == tokens, f"the default text has only {ids.shape[1]} tokens"

    def work() -> None:
        with torch.no_grad():
            if mode == "plain":
                model(ids, use_cache=False)
            elif mode == "eager":
                out = model(ids, use_cache=False, output_attentions=True)
                assert len(out.attentions) == model.config.num_hidden_layers
            else:
                ins.diagnostics(model, tokenizer, ids, chunk=chunk, ablation=False, progress=False)

    with torch.no_grad():
        model(ids[:, :64], use_cache=False)  # warm-up: first-call allocations and lazy init
    rss_before = _status_kib("VmRSS")
    _reset_peak()
    times, cpu = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), _cpu_seconds()
        work()
        times.append(time.perf_counter() - t)
        cpu.append(_cpu_seconds() - c)
    peak = _status_kib("VmHWM")
    return {"mode": mode, "tokens": tokens, "seconds": min(times), "all_seconds": times, "cpu_seconds": min(cpu),
            "rss_before_mib": rss_before / 1024, "peak_rss_mib": peak / 1024,
            "peak_extra_mib": (peak - rss_before) / 1024, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--modes", default="plain,inspect,eager")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="append a markdown table here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.repeat, args.chunk, args.threads)))
        return
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--child", mode, "--tokens", str(args.tokens),
               "--repeat", str(1 if mode == "eager" else args.repeat), "--chunk", str(args.chunk)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{mode}: failed (rc {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            rows.append({"mode": mode, "tokens": args.tokens, "failed": proc.stderr.strip().splitlines()[-1:]})
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row))
    plain = next((r for r in rows if r["mode"] == "plain" and "seconds" in r), None)
    threads = f", {args.threads} thread(s)" if args.threads else ""
    lines = [f"\n### {args.tokens} tokens, chunk {args.chunk} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs{threads}, load {os.getloadavg()[0]:.1f})\n",
             "| mode | time (s) | x plain | CPU time (s) | CPU x plain | peak RSS (MiB) | peak over loaded model (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "seconds" not in r:
            lines.append(f"| {r['mode']} | failed: {r['failed']} | | | | | |")
            continue
        ratio = f"{r['seconds'] / plain['seconds']:.2f}" if plain else ""
        cpu_ratio = f"{r['cpu_seconds'] / plain['cpu_seconds']:.2f}" if plain else ""
        lines.append(f"| {r['mode']} | {r['seconds']:.2f} | {ratio} | {r['cpu_seconds']:.2f} | {cpu_ratio} | "
                     f"{r['peak_rss_mib']:.0f} | {r['peak_extra_mib']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
