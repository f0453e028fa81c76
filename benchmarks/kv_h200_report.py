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


def wilson(correct: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson 95% interval of ``correct`` successes out of ``n``."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre, half = p + z * z / (2 * n), z * ((p * (1 - p) + z * z / (4 * n)) / n) ** 0.5
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def first_n(r: dict, n: int) -> tuple[float, int]:
    """(correct, count) over the records of sample index < n (the first n samples: the same prompts a run
    with ``n`` samples has, since a task's generator draws its samples in order)."""
    recs = [x for x in r.get("records", []) if x["index"] < n]
    return sum(x["score"] for x in recs), len(recs)


def kv_table(results: dict, full: dict | None = None, first: int | None = None) -> list[str]:
    """Rows of {label: {task: PolicyResult dict}}; ``full``: {task: accuracy} for the "vs full" column;
    ``first``: also the accuracy over the first ``first`` samples (when the run has more)."""
    full = full or {task: r["accuracy"] for task, r in results.get("full", {}).items()}
    extra_head = f" first {first}: accuracy [95% CI] | vs full |" if first else ""
    out = ["| task | policy | budget | n | accuracy | 95% CI | vs full | kept KV | protected KV heads / window "
           "| decode tok/s (batch) |" + extra_head, "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if first else "")]
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
            row = (f"| {task} | {label} | {r['budget']:g} | {r['n_samples']} | {r['accuracy']:.3f} | "
                   f"[{lo:.2f}, {hi:.2f}] | {rel:.2f} | {r['kept_fraction']:.3f} | {heads} | "
                   f"{r['decode_tokens_per_s']:.1f} |")
            if first:
                c, n = first_n(r, first)
                fc, fn = first_n(results["full"][task], first) if "full" in results and task in results["full"] else (0, 0)
                a, (flo, fhi) = (c / n if n else float("nan")), wilson(c, n)
                frel = a / (fc / fn) if fn and fc else float("nan")
                row += f" {c:g}/{n} = {a:.3f} [{flo:.2f}, {fhi:.2f}] | {frel:.2f} |"
            out.append(row)
    return out


def pooled_table(per_seed: dict) -> list[str]:
    """{seed: {label: {task: result}}} -> rows of correct / n pooled over the seeds, with Wilson intervals, and
    the paired count against full: samples full answers right and the policy wrong (lost) and the reverse (won)."""
    out = ["| task | policy | correct / n | accuracy | 95% CI | vs full | lost vs full | won vs full |",
           "|---|---|---|---|---|---|---|---|"]
    labels = list(dict.fromkeys(label for res in per_seed.values() for label in res))
    tasks = sorted({t for res in per_seed.values() for per in res.values() for t in per})
    for task in tasks:
        fc = sum(sum(x["score"] for x in res["full"][task]["records"]) for res in per_seed.values()
                 if "full" in res and task in res["full"])
        for label in labels:
            c = n = lost = won = 0
            for res in per_seed.values():
                r = res.get(label, {}).get(task)
                if r is None:
                    continue
                c += sum(x["score"] for x in r["records"])
                n += len(r["records"])
                f = {x["index"]: x["score"] for x in res.get("full", {}).get(task, {}).get("records", [])}
                for x in r["records"]:
                    lost += f.get(x["index"], 0) > x["score"]
                    won += f.get(x["index"], 1) < x["score"]
            if n == 0:
                continue
            lo, hi = wilson(c, n)
            out.append(f"| {task} | {label} | {c:g}/{n} | {c / n:.3f} | [{lo:.2f}, {hi:.2f}] | "
                       f"{c / fc if fc else float('nan'):.2f} | {lost} | {won} |")
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
    probe = _read(scratch / "probe.json")
    data = dict(env=env, kv=kv, speed=speed, retrieval_heads=heads, probe=probe)
    (outdir / "kv_h200.json").write_text(json.dumps(data, indent=1, default=str))
    md = [f"# KV policies and retrieval heads on {env.get('device', '?')}", "",
          f"torch {env.get('torch')}, transformers {env.get('transformers')}. SmolLM2-135M-Instruct, float32. "
          f"Command: `{kv.get('command')}` ({kv.get('seconds', '?')} s).", ""]
    rep = steps.get("report")
    md += [f"## Reported: seed 0, budget 0.3 (70% of KV bytes dropped)", ""]
    if rep:
        n_rep = max(r["n_samples"] for per in rep["results"].values() for r in per.values())
        md += kv_table(rep["results"], first=50 if n_rep > 50 else None)
        if n_rep > 50:
            md += ["", f"n={n_rep} is the reported size (decided before the run); the last columns are its first 50 "
                   "samples, the same prompts as a run with n=50, kept beside it (not a choice between them)."]
    else:
        md += ["(the run failed, ran out of time, or reported nothing: `--report none`)"]
    tune = steps.get("tune")
    seeds = tune["seed"] if tune else 1
    md += ["", f"## Razor settings chosen on the tuning seed(s) ({seeds}), never on seed 0", ""]
    if tune:
        among = f" among {', '.join(tune['candidates'])}" if tune.get("candidates") else ""
        pooled = " pooled over the tuning seeds" if isinstance(seeds, list) else ""
        md += [f"Chosen: `{tune['chosen']}` = {tune['chosen_kwargs']} (best mean accuracy over both tasks{pooled}{among}).", ""]
        if isinstance(seeds, list):
            for seed, res in tune["results"].items():
                md += [f"### tuning seed {seed}", ""] + kv_table(res) + [""]
            md += ["### pooled over the tuning seeds", ""] + pooled_table(tune["results"])
        else:
            md += kv_table(tune["results"])
    else:
        md += ["(missing)"]
    if probe:
        base = {tuple(c) for c in probe["base_protected"][:20]}
        top = [tuple(c) for c in probe["order"][:20]]
        md += ["", f"## Head probe (seed {probe['args']['probe_seed']}, {probe['n_samples']} samples)", "",
               f"Top 20 KV heads (layer, head) by marginal value at razor's operating point: {top}; "
               f"{len(base & set(top))} of them among the default's protected heads."]
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
