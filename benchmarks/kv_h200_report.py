"""Merge what ``benchmarks/h200_kv.sh`` left in its scratch folder into two files: kv_h200.json and kv_h200.md.

    python3 benchmarks/kv_h200_report.py SCRATCH OUTDIR

Every piece is optional (a piece that failed or ran out of time leaves nothing, or a partial file);
the markdown says which pieces are missing. Accuracy rows come with Wilson 95% intervals.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def kv_table(results: dict, full: dict | None = None) -> list[str]:
    """Rows of {label: {task: PolicyResult dict}}; ``full``: {task: accuracy} for the "vs full" column."""
    full = full or {task: r["accuracy"] for task, r in results.get("full", {}).items()}
    out = ["| task | policy | budget | n | accuracy | 95% CI | vs full | kept KV | protected KV heads / window "
           "| decode tok/s (batch) |", "|---|---|---|---|---|---|---|---|---|---|"]
    tasks = sorted({t for per in results.values() for t in per})
    for task in tasks:
        for label, per in results.items():
            r = per.get(task)
            if r is None:
                continue
            lo, hi = r["ci95"]
            rel = r["accuracy"] / full[task] if full.get(task) else float("nan")
            heads = f"{len(r['protected'])} / {r['window']}" if "protected" in r else ""
            if r.get("snap"):  # Razor(snap_share): the window holds snap-chosen + recent entries
                heads += f" ({r['snap']} snap + {r['window'] - r['snap']} recent)"
            out.append(f"| {task} | {label} | {r['budget']:g} | {r['n_samples']} | {r['accuracy']:.3f} | "
                       f"[{lo:.2f}, {hi:.2f}] | {rel:.2f} | {r['kept_fraction']:.3f} | {heads} | "
                       f"{r['decode_tokens_per_s']:.1f} |")
    return out


def speed_table(speed: dict) -> list[str]:
    rows = speed["rows"]
    base = {(r["policy"], r["batch"]): r["decode_tok_s"] for r in rows}
    out = ["| policy | batch | kept KV | prefill tok/s | decode tok/s | vs full | vs plain |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        full, plain = base.get(("full", r["batch"])), base.get(("plain", r["batch"]))
        out.append(f"| {r['policy']} | {r['batch']} | {r['kept_fraction']:.3f} | {r['prefill_tok_s']:.0f} | "
                   f"{r['decode_tok_s']:.1f} | {r['decode_tok_s'] / full if full else float('nan'):.2f} | "
                   f"{r['decode_tok_s'] / plain if plain else float('nan'):.2f} |")
    return out


def heads_table(heads: dict) -> list[str]:
    out = [f"{heads['n_retrieval_heads']} of {heads['n_heads']} heads ({heads['fraction_above_threshold']:.1%}) "
           f"have retrieval score > {heads['threshold']} (paper: < 5%).", "",
           "| heads masked | K | seed | accuracy | 95% CI |", "|---|---|---|---|---|"]
    for c in heads["conditions"]:
        seed = "" if c["seed"] is None else c["seed"]
        out.append(f"| {c['mask']} | {c['k']} | {seed} | {c['correct']:g}/{c['n']} = {c['accuracy']:.2f} | "
                   f"[{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}] |")
    return out


def main(argv=None) -> int:
    scratch, outdir = (Path(a) for a in (argv or sys.argv[1:]))
    outdir.mkdir(parents=True, exist_ok=True)
    kv = _read(scratch / "kv.json") or {}
    steps = kv.get("steps", {})
    speed = _read(scratch / "speed.json")
    heads = _read(scratch / "retrieval_heads.json")
    env = {}
    try:
        import torch
        import transformers

        env = dict(torch=torch.__version__, transformers=transformers.__version__,
                   device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    except Exception as err:  # the report must still be written
        env = dict(error=repr(err))
    data = dict(env=env, kv=kv, speed=speed, retrieval_heads=heads)
    (outdir / "kv_h200.json").write_text(json.dumps(data, indent=1, default=str))
    md = [f"# KV policies and retrieval heads on {env.get('device', '?')}", "",
          f"torch {env.get('torch')}, transformers {env.get('transformers')}. SmolLM2-135M-Instruct, float32. "
          f"Command: `{kv.get('command')}` ({kv.get('seconds', '?')} s).", ""]
    rep = steps.get("report")
    md += [f"## Reported: seed 0, budget 0.3 (70% of KV bytes dropped)", ""]
    md += kv_table(rep["results"]) if rep else ["(missing: the run failed or ran out of time)"]
    tune = steps.get("tune")
    md += ["", f"## Razor settings chosen on the tuning seed ({tune['seed'] if tune else 1}), never on seed 0", ""]
    if tune:
        among = f" among {', '.join(tune['candidates'])}" if tune.get("candidates") else ""
        md += [f"Chosen: `{tune['chosen']}` = {tune['chosen_kwargs']} (best mean accuracy over both tasks{among}).", ""]
        md += kv_table(tune["results"])
    else:
        md += ["(missing)"]
    extra = steps.get("extra_budgets")
    md += ["", "## Other budgets (seed 0)", ""]
    if extra:
        full = {t: r["accuracy"] for t, r in rep["results"]["full"].items()} if rep else None
        merged = {f"{label} @{b}": per for b, res in extra.items() for label, per in res.items()}
        md += kv_table(merged, full)
    else:
        md += ["(not run: out of time)"]
    md += ["", "## Decode speed (32 new tokens)", ""]
    md += speed_table(speed) if speed else ["(missing)"]
    md += ["", "## Retrieval-head masking", ""]
    md += heads_table(heads) if heads else ["(missing)"]
    (outdir / "kv_h200.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
