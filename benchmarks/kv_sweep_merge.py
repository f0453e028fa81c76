"""Merge per-task `attnlab kv sweep` outputs into one figure, table and JSON, and check the targets.

The sweep ran one process per task (the tasks are independent; two processes share the CPU better):

    OMP_NUM_THREADS=1 attnlab kv sweep --task needle   --length 4096 --budgets 0.1 0.3 0.5 --samples 8 \\
        --max-new-tokens 12 --out benchmarks/results/kv_sweep/needle
    OMP_NUM_THREADS=1 attnlab kv sweep --task multikey --length 4096 --budgets 0.1 0.3 0.5 --samples 8 \\
        --max-new-tokens 12 --out benchmarks/results/kv_sweep/multikey
    python benchmarks/kv_sweep_merge.py

Reads each run's kv_sweep.json (or, for an unfinished run, its partial_<task>.json), pools runs of
the same task (more seeds, e.g. `--seed 1 --out .../needle_seed1`) sample by sample, and writes
benchmarks/results/kv_sweep.{json,md,png}.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from attnlab.kv.evaluate import PolicyResult
from attnlab.kv.figures import sweep_figure, sweep_table

HERE = Path(__file__).parent / "results"


def load_results(task_dir: Path) -> tuple[list[PolicyResult], str, bool]:
    done = task_dir / "kv_sweep.json"
    if done.exists():
        data = json.loads(done.read_text())
        return [PolicyResult(**r) for r in data["results"]], data["command"], True
    partial = sorted(task_dir.glob("partial_*.json"))
    if not partial:
        return [], "", False
    return [PolicyResult(**r) for r in json.loads(partial[0].read_text())], "(unfinished)", False


def pool(results: list[PolicyResult]) -> list[PolicyResult]:
    """One result per (task, policy, budget): runs with different seeds pooled sample by sample."""
    from attnlab.tasks import wilson_interval

    groups: dict[tuple, list[PolicyResult]] = {}
    for r in results:
        groups.setdefault((r.task, r.policy, r.budget), []).append(r)
    out = []
    for (task, policy, budget), rs in groups.items():
        recs = [x for r in rs for x in r.records]
        n = len(recs)
        score = sum(x["score"] for x in recs)
        kept = sum(r.kept_bytes * r.n_samples for r in rs)
        full = sum(r.full_bytes * r.n_samples for r in rs)
        p_tok = [sum(x["prompt_tokens"] for x in r.records) for r in rs]
        p_sec = sum(t / r.prefill_tokens_per_s for t, r in zip(p_tok, rs))
        d_sec = sum(x["decode_s"] for x in recs)
        d_tok = sum(x["new_tokens"] - 1 for x in recs)
        out.append(PolicyResult(policy, budget, task, rs[0].length, n, score / n, wilson_interval(score, n),
                                kept / n, full / n, kept / full, sum(p_tok) / p_sec,
                                d_tok / d_sec if d_sec else float("nan"), recs))
    return out


def targets(results: list[PolicyResult]) -> list[str]:
    """The issue's accuracy targets, judged on these numbers."""
    lines = []
    for task in dict.fromkeys(r.task for r in results):
        rows = [r for r in results if r.task == task]
        full = next((r for r in rows if r.policy == "full"), None)
        if full is None:
            continue
        for razor in (r for r in rows if r.policy == "razor"):
            saved = 1 - razor.kept_fraction
            rel = razor.accuracy / full.accuracy if full.accuracy else float("nan")
            peers = {r.policy: r.accuracy for r in rows if r.budget == razor.budget and r.policy in ("streaming", "snapkv")}
            beats = all(razor.accuracy > a for a in peers.values())
            ok = rel >= 0.95 and saved >= 0.70
            lines.append(f"- {task}, razor budget {razor.budget:g}: {saved:.0%} KV bytes saved, accuracy "
                         f"{razor.accuracy:.3f} vs full {full.accuracy:.3f} ({rel:.2f} of full): "
                         f"{'MET' if ok else 'not met'} (target >= 0.95 at >= 70% saved); vs streaming/snapkv "
                         f"at the same budget {peers}: {'beats both' if beats else 'does not beat both'}.")
    return lines


def main() -> int:
    """Usage: kv_sweep_merge.py [NAME] merges benchmarks/results/NAME/* into NAME.{json,md,png} (default kv_sweep)."""
    name = sys.argv[1] if len(sys.argv) > 1 else "kv_sweep"
    results, commands, complete = [], [], True
    for task_dir in sorted(p for p in (HERE / name).iterdir() if p.is_dir()):
        rs, cmd, done = load_results(task_dir)
        results += rs
        commands.append(f"{task_dir.name}: {cmd}")
        complete &= done
    if not results:
        print("no sweep results found", file=sys.stderr)
        return 1
    results = pool(results)
    n = {r.task: r.n_samples for r in results}
    sweep_figure(results, HERE / f"{name}.png",
                 title=f"SmolLM2-135M, {results[0].length} tokens: accuracy vs KV bytes kept")
    table = sweep_table(results)
    notes = ["", "Commands (one process per task, `OMP_NUM_THREADS=1`, shared 2-core CPU):", ""]
    notes += [f"    {c}" for c in commands]
    notes += ["", f"Samples per point: {n}{'' if complete else ' (a run was unfinished: partial results)'}. "
              "Speeds were measured on a heavily shared machine (load average 20-35): compare rows, "
              "not absolute numbers; benchmarks/results/kv_speed_1k.md times each policy in isolation.", "",
              "## Targets", ""] + targets(results)
    (HERE / f"{name}.md").write_text(table + "\n".join(notes) + "\n")
    (HERE / f"{name}.json").write_text(json.dumps(dict(commands=commands, complete=complete,
                                                        results=[r.to_dict() for r in results]), indent=1))
    print(table + "\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
