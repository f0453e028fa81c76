"""Few-shot classification accuracy of every registered intervention against the unmodified model.

Run: python3 benchmarks/interventions_accuracy.py [--tasks sst2 agnews trec cb rte] [--interventions act ...]
         [--samples 60] [--dev-samples 16] [--shots 4] [--seed 0] [--threads N] [--model smollm2] [--device cuda]
         [--batch-size 32] [--deadline SECONDS]
Writes benchmarks/results/interventions_accuracy.json (after every cell, so a cut run keeps its cells)
and interventions_accuracy.md. `--merge a.json b.json` joins runs made in parallel (one per task).

Per task: one set of `--shots` demonstrations (seed), `--samples` test rows (a fixed random subset of
the reported split) and `--dev-samples` dev rows (a disjoint split; data README). The unmodified
model is scored once per task; each intervention's hyperparameters are chosen among its `grid` by
uncalibrated dev accuracy, then it is scored on the same test prompts, and the paired delta gets a
paired-bootstrap 95% interval. Primitives that need user arguments (a one-entry grid `{}` and no
paper: head_mask, head_scale) are skipped. `--batch-size` scores that many prompts per forward
(left-padded, same numbers as batch 1 up to float32 rounding); `--deadline` stops starting new cells
after that many seconds (the cells done are kept).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import traceback
from pathlib import Path


RESULTS = Path(__file__).parent / "results"
START = time.perf_counter()

#: What each paper reports on classification, to sit beside our number (from the papers' abstracts).
PAPER_NUMBERS = {
    "act": "up to +7.30% average accuracy across datasets (Llama-30B)",
    "zerotuning": "+11.7% average on classification (Llama-3.1-8B)",
    "var": "no text-classification number (vision-language benchmarks only)",
    "head_modulation": "no text-classification number (LVLM hallucination benchmarks only)",
    "layer_drop": "Llama-2-70B: half the attention layers dropped, ~48% faster, small average drop (zero/few-shot tasks)",
    "echoatt": "TinyLLaMA-1.1B with distillation: ~15% faster inference, zero-shot slightly better; none training-free",
    "selective_temperature": "no training-free number (trained Selective Attention, language modelling perplexity)",
}


def needs_user_args(spec) -> bool:
    return spec.grid in ((), ({},)) and not spec.paper


def run_task(task: str, names: list[str], model, tok, args, log):
    """Yields one result dict per intervention on `task` (the baseline is scored once)."""
    from attnlab.eval import Scores, choose_hyper, classification_prompts, model_context, paired_delta, score_prompts, scores_with
    from attnlab.interventions import INTERVENTIONS
    ctx = model_context(model)
    t0 = time.perf_counter()
    test = classification_prompts(task, tok, "test", args.shots, args.seed, args.samples, ctx)
    dev = classification_prompts(task, tok, "dev", args.shots, args.seed, args.dev_samples, ctx)
    bs = args.batch_size
    base = Scores.of(*score_prompts(model, tok, test, False, f"{task} test baseline", bs), test.labels)
    dev_base = None if args.no_search else Scores.of(*score_prompts(model, tok, dev, False, f"{task} dev baseline", bs),
                                                     dev.labels)
    base_s = time.perf_counter() - t0
    log(f"{task}: baseline {base.line()}  ({base_s:.0f} s)")
    calibration = dev.prompts[:32]
    for name in names:
        if args.deadline and time.perf_counter() - START > args.deadline:
            log(f"{task} {name}: skipped, past the --deadline of {args.deadline:.0f} s")
            continue
        spec = INTERVENTIONS[name]
        cell = dict(task=task, intervention=name, paper=spec.paper, paper_number=PAPER_NUMBERS.get(name, ""),
                    n_test=len(test.rows), test_split_size=test.split_size, n_dev=len(dev.rows),
                    mean_prompt_tokens=sum(map(len, test.prompts)) / len(test.prompts),
                    baseline=base, baseline_seconds=base_s)
        t1 = time.perf_counter()
        try:
            candidates = [dict(g) for g in spec.grid] or [{}]
            chosen, search = candidates[0], None
            if len(candidates) > 1 and not args.no_search:
                chosen, search = choose_hyper(spec, candidates, model, tok, dev, calibration, progress=False,
                                              dev_baseline=dev_base, batch_size=bs)
            mod = scores_with(spec, chosen, model, tok, test, calibration, False, f"{task} test {name}", batch_size=bs)
            cell.update(hyper=chosen, dev=search, modified=mod, delta=paired_delta(base, mod))
            log(f"{task} {name} {chosen}: {mod.line()}  delta {cell['delta']['uncalibrated']:+.3f} "
                f"/ cal {cell['delta']['calibrated']:+.3f}  ({time.perf_counter() - t1:.0f} s)")
        except Exception as err:  # another helper's intervention failing must not sink the whole table
            cell["error"] = f"{type(err).__name__}: {err}"
            log(f"{task} {name}: ERROR {cell['error']}\n{traceback.format_exc(limit=3)}")
        cell["seconds"] = time.perf_counter() - t1
        yield cell


def _ci(x: float, ci, signed: bool = False) -> str:
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(100 * x)} [{f.format(100 * ci[0])}, {f.format(100 * ci[1])}]"


def markdown(cells: list[dict], meta: dict) -> str:
    lines = [
        f"# Interventions on few-shot classification ({meta.get('model', 'smollm2')}, {meta['machine']})",
        "",
        f"Command: `{meta['command']}`  ",
        f"{meta['shots']}-shot, seed {meta['seed']}; at most {meta['samples']} test rows and {meta['dev_samples']} dev "
        f"rows per task (fixed random subsets, or the whole split when smaller; the task column says test/dev rows). "
        f"Accuracy in %, label-word log-likelihood; "
        "95% bootstrap intervals; delta = intervention - baseline on the same prompts, paired bootstrap. "
        + ("No dev search (--no-search): each intervention runs with its grid's first entry, its default. "
           if meta.get("no_search") else
           "Hyperparameters chosen by uncalibrated dev accuracy among each intervention's grid. ") +
        f"Total {meta['seconds'] / 60:.1f} min (wall, summed over runs) on {meta['machine']}, "
        f"commit {meta.get('commit', '?')}.",
        "",
        "| task | intervention | chosen | baseline | with intervention | delta | baseline calibrated | "
        "calibrated with intervention | delta calibrated | paper reports |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in cells:
        b = c["baseline"]
        if "error" in c:
            lines.append(f"| {c['task']} ({c['n_test']}/{c['n_dev']}) | {c['intervention']} | error: {c['error'][:80]} | "
                         f"{_ci(b['uncalibrated'], b['uncalibrated_ci'])} | | | "
                         f"{_ci(b['calibrated'], b['calibrated_ci'])} | | | {c['paper_number']} |")
            continue
        m, d = c["modified"], c["delta"]
        lines.append(
            f"| {c['task']} ({c['n_test']}/{c['n_dev']}) | {c['intervention']} | `{json.dumps(c['hyper'])}` | "
            f"{_ci(b['uncalibrated'], b['uncalibrated_ci'])} | {_ci(m['uncalibrated'], m['uncalibrated_ci'])} | "
            f"{_ci(d['uncalibrated'], d['uncalibrated_ci'], True)} | {_ci(b['calibrated'], b['calibrated_ci'])} | "
            f"{_ci(m['calibrated'], m['calibrated_ci'])} | {_ci(d['calibrated'], d['calibrated_ci'], True)} | "
            f"{c['paper_number']} |")
    ran = {c["intervention"] for c in cells}  # merged runs: another run may have done what this one skipped
    skipped = [n for n in meta["skipped"] if n not in ran]
    if skipped:
        lines += ["", f"Not run (primitives that need user arguments, or left out by --interventions): "
                      f"{', '.join(skipped)}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    # heavy imports here, so that the markdown functions import light (benchmarks/h200_interventions.sh merges)
    import torch

    from attnlab.hf import load
    from attnlab.interventions import INTERVENTIONS
    from attnlab.tasks.classification import CLASSIFICATION_TASKS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(CLASSIFICATION_TASKS), choices=list(CLASSIFICATION_TASKS))
    ap.add_argument("--interventions", nargs="+", default=None, help="default: every registered one with a grid")
    ap.add_argument("--samples", type=int, default=60)
    ap.add_argument("--dev-samples", type=int, default=16)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-search", action="store_true",
                    help="skip the dev search: each intervention runs with its grid's first entry (its default)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for a larger run on a GPU")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per forward (1: the per-prompt path)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds after start past which no new cell starts (cells done are kept)")
    ap.add_argument("--out", default=str(RESULTS / "interventions_accuracy"))
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="only merge the cells of earlier runs (e.g. one process per task) into --out")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, Path(args.out))
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.interventions or [n for n, s in INTERVENTIONS.items() if not needs_user_args(s)]
    unknown = sorted(set(names) - set(INTERVENTIONS))
    if unknown:
        raise SystemExit(f"unknown interventions {unknown}; registered: {sorted(INTERVENTIONS)}")
    skipped = [n for n in INTERVENTIONS if n not in names]
    model, tok = load(args.model, device=args.device)
    meta = dict(command="python3 " + " ".join(["benchmarks/interventions_accuracy.py"] + _argv()),
                model=args.model or "smollm2", shots=args.shots, seed=args.seed, samples=args.samples,
                dev_samples=args.dev_samples, no_search=args.no_search, skipped=skipped, threads=torch.get_num_threads(),
                machine=(torch.cuda.get_device_name() if args.device.startswith("cuda")
                         else f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads"),
                seconds=0.0, commit=_commit())
    start, cells = time.perf_counter(), []
    out = Path(args.out)

    def save() -> None:
        meta["seconds"] = time.perf_counter() - start
        plain = json.loads(json.dumps(cells, default=lambda o: o.__dict__))
        for c in plain:  # per-row vectors make the json large; the md needs only the summaries
            for key in ("baseline", "modified"):
                if key in c:
                    c[key].pop("log_likelihoods", None)
        out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, cells=plain), indent=1))
        out.with_suffix(".md").write_text(markdown(plain, meta))

    for task in args.tasks:
        for cell in run_task(task, names, model, tok, args, lambda s: print(s, flush=True)):
            cells.append(cell)
            save()
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({len(cells)} cells)", flush=True)


def merge(paths: list[str], out: Path) -> None:
    """One table from several runs' json files (their settings must agree but for --tasks)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    meta = dict(runs[0]["meta"], commands=[r["meta"]["command"] for r in runs],
                seconds=sum(r["meta"]["seconds"] for r in runs))
    meta["command"] = " ; ".join(meta["commands"])
    cells = [c for r in runs for c in r["cells"]]
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, cells=cells), indent=1))
    out.with_suffix(".md").write_text(markdown(cells, meta))
    print(markdown(cells, meta))


def _argv() -> list[str]:
    import sys
    return sys.argv[1:]


def _commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    main()
