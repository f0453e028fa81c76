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


def _wilson(k: float, n: int) -> tuple[float, float]:
    from attnlab.tasks import wilson_interval

    return wilson_interval(k, n) if n else (0.0, 1.0)


def sweep_results(scratch: Path) -> list[dict]:
    """Finished tasks from kv_sweep.json, plus the partial checkpoint of an unfinished task."""
    done = _read(scratch / "sweep" / "kv_sweep.json")
    rows = list(done["results"]) if done else []
    tasks = {r["task"] for r in rows}
    for part in sorted((scratch / "sweep").glob("partial_*.json")):
        extra = _read(part) or []
        if extra and extra[0]["task"] not in tasks:
            rows += extra
    return rows


def sweep_table(rows: list[dict]) -> list[str]:
    full = {r["task"]: r["accuracy"] for r in rows if r["policy"] == "full"}
    out = ["| task | policy | budget | n | accuracy | 95% CI | vs full | kept KV | decode tok/s (batch) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["ci95"]
        rel = r["accuracy"] / full[r["task"]] if full.get(r["task"]) else float("nan")
        out.append(f"| {r['task']} | {r['policy']} | {r['budget']:g} | {r['n_samples']} | {r['accuracy']:.3f} | "
                   f"[{lo:.2f}, {hi:.2f}] | {rel:.2f} | {r['kept_fraction']:.3f} | {r['decode_tokens_per_s']:.1f} |")
    return out


def tune_table(tune: dict) -> list[str]:
    out = ["| variant | task | n | accuracy | kept KV | protected KV heads | window |", "|---|---|---|---|---|---|---|"]
    for name, per_task in tune["results"].items():
        for task, r in per_task.items():
            prot = len(r.get("protected", [])) if "protected" in r else "-"
            out.append(f"| {name} | {task} | {r['n_samples']} | {r['accuracy']:.3f} | {r['kept_fraction']:.3f} | "
                       f"{prot} | {r.get('window', '-')} |")
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
    sweep = sweep_results(scratch)
    sweep_meta = _read(scratch / "sweep" / "kv_sweep.json") or {}
    tune = _read(scratch / "tune.json")
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
    data = dict(env=env, sweep=dict(command=sweep_meta.get("command"), results=sweep), tune=tune, speed=speed,
                retrieval_heads=heads)
    (outdir / "kv_h200.json").write_text(json.dumps(data, indent=1, default=str))
    md = [f"# KV policies and retrieval heads on {env.get('device', '?')}", "",
          f"torch {env.get('torch')}, transformers {env.get('transformers')}. SmolLM2-135M-Instruct, float32.", ""]
    md += ["## Accuracy at 70% of KV bytes dropped (seed 0)", ""]
    md += ([f"Command: `{sweep_meta.get('command')}`", ""] + sweep_table(sweep)) if sweep else ["(missing: the sweep failed or ran out of time)"]
    md += ["", "## Razor variants on the tuning seed (1)", ""]
    md += tune_table(tune) if tune else ["(missing)"]
    md += ["", "## Decode speed (32 new tokens, best of 2 repeats)", ""]
    md += speed_table(speed) if speed else ["(missing)"]
    md += ["", "## Retrieval-head masking", ""]
    md += heads_table(heads) if heads else ["(missing)"]
    (outdir / "kv_h200.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
