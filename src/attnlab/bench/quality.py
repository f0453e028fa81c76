"""``attnlab bench quality``: train every registered mechanism on the synthetic tasks at equal budget.

MQAR (paper 21, "Zoology: Measuring and Improving Recall in Efficient Language Models") is the
main axis: accuracy vs sequence length N (with N/16 key-value pairs, Zoology's (64, 4),
(128, 8), (256, 16)) and model width. For every width w the softmax model has d_model = w; each
other mechanism gets the d_model (a multiple of 2 n_heads) whose TinyTransformer has the
parameter count closest to softmax's, so a mechanism with extra parameters gets a narrower model
(equal parameter budget). Other tasks, one row per mechanism: in-context linear regression
(paper 6) against the Bayes-optimal ridge error; positional-attention algorithmic tasks (paper
42) trained at n=8 and tested at n=8 and n=16; ListOps (LRA); Scan and Snap (paper 34).

Each run is one seeded ``attnlab.train`` call (fresh batches each step, held-out eval batch).
A mechanism that fails to build or train on a setting gets an ``error`` row, not a crash.
Writes ``quality.json`` (config, command, rows), ``quality.md`` (tables) and ``quality.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..mechanisms import MECHANISMS
from ..models import for_task
from ..tasks import MQAR, Algorithmic, LinearRegressionICL, ListOps, ScanSnap
from ..train import EVAL_SEED, TrainConfig, evaluate, train

EXTRA_TASKS = ("icl", "algorithmic", "listops", "scan_snap")


@dataclass
class QualityConfig:
    mechanisms: list[str] | None = None  # None: every registered mechanism
    lengths: list[int] = field(default_factory=lambda: [64, 128])  # MQAR N; K = N / 16 pairs (Zoology also 256, 512)
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])  # softmax d_model per budget (Zoology: 64-512)
    vocab_size: int = 256  # Zoology uses 8192; a small vocabulary trains faster on CPU, recall is as hard
    n_layers: int = 2  # Zoology: 2 layers, attention only
    n_heads: int = 2  # head-level mechanisms (MoH, HiLo) need several heads
    short_conv: int = 2  # MQAR models read each token's predecessor through a short conv (see models.py)
    steps: int = 300  # per MQAR run, stopping early at 99%: softmax needs ~120 (N=64) to ~360 (N=256)
    batch_size: int = 64
    lr: float = 3e-3
    extra: list[str] = field(default_factory=lambda: ["icl", "algorithmic", "scan_snap"])  # also: listops
    extra_steps: int = 300
    seed: int = 0
    device: str = "cpu"
    jobs: int = 1  # parallel training processes
    max_minutes: float | None = None  # start no new run after this long (the rest is reported as not run)
    progress: bool = True


def quick_config() -> QualityConfig:
    """About a minute per mechanism on one core: MQAR N=32, one width; short ICL and Scan&Snap runs."""
    return QualityConfig(lengths=[32], widths=[32], vocab_size=64, steps=150, extra=["icl", "scan_snap"],
                         extra_steps=100)


def mechanisms_of(config: QualityConfig) -> list[str]:
    names = config.mechanisms or list(MECHANISMS)
    unknown = [m for m in names if m not in MECHANISMS]
    if unknown:
        raise ValueError(f"`mechanisms` has unregistered names {unknown}; registered: {sorted(MECHANISMS)}")
    return names


def build(task, mechanism: str, d_model: int, config: QualityConfig, **kw: Any):
    torch.manual_seed(config.seed)
    return for_task(task, mechanism, d_model=d_model, n_layers=config.n_layers, n_heads=config.n_heads, **kw)


def matched_width(task, mechanism: str, width: int, config: QualityConfig, **kw: Any) -> int:
    """The d_model at which ``mechanism``'s model has the parameter count closest to softmax's at ``width``."""
    if mechanism == "softmax":
        return width
    budget = build(task, "softmax", width, config, **kw).n_params()
    step = 2 * config.n_heads
    best, best_gap = width, None
    for d in range(max(step, width // 2 // step * step), 2 * width + 1, step):
        try:
            gap = abs(build(task, mechanism, d, config, **kw).n_params() - budget)
        except Exception:  # some widths do not suit a mechanism (head splits); skip them
            continue
        if best_gap is None or gap < best_gap or (gap == best_gap and abs(d - width) < abs(best - width)):
            best, best_gap = d, gap
    return best


def run_one(task, mechanism: str, width: int, config: QualityConfig, steps: int, test_tasks=(), **kw: Any) -> dict:
    """Train one model; the row holds its size, metric, time and any error."""
    row: dict[str, Any] = dict(task=repr(task), mechanism=mechanism, width=width, metric_name=task.metric)
    try:
        d = matched_width(task, mechanism, width, config, **kw)
        model = build(task, mechanism, d, config, **kw)
        row.update(d_model=d, params=model.n_params(), mixer_params=model.n_params(mixer_only=True))
        result = train(model, task, TrainConfig(steps=steps, batch_size=config.batch_size, lr=config.lr,
                                                eval_every=max(1, steps // 5), seed=config.seed, device=config.device,
                                                target=0.99 if task.higher_is_better else None,
                                                progress=config.progress))
        row.update(metric=result.metric, best=result.best, steps=result.steps, seconds=round(result.seconds, 1))
        for name, other in test_tasks:
            batch = other.sample(512, seed=10**6 + config.seed).to(config.device)
            row[name] = evaluate(model, other, batch)[1]
    except Exception as e:  # one mechanism's failure must not end the sweep
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def run_job(job: tuple, config: QualityConfig) -> dict:
    """One row: ("mqar", mechanism, N, width) or (extra task, mechanism, None, width)."""
    kind, mech, n, w = job
    if config.device == "cpu":
        torch.set_num_threads(1)  # tiny models: one thread each is fastest, parallelism is across jobs
    quiet = replace(config, progress=False)
    if kind == "mqar":
        task = MQAR(n, max(1, n // 16), max(config.vocab_size, 2 * n))
        return dict(run_one(task, mech, w, quiet, config.steps, short_conv=config.short_conv), seq_len=n)
    return extra_run(kind, mech, w, quiet)


def job_key(row: dict) -> tuple:
    """(kind, mechanism, N, width) of a finished row, the key ``--resume`` matches jobs by."""
    return (row.get("kind", "mqar"), row["mechanism"], row.get("seq_len"), row["width"])


def sweep(config: QualityConfig, partial: str | None = None, done_rows: list[dict] = ()) -> list[dict]:
    """All rows: MQAR over mechanisms x lengths x widths, then the extra tasks at the middle width.

    ``config.jobs`` > 1 runs that many processes (CPU); ``partial`` is a JSON file rewritten after
    every finished row, so an interrupted sweep keeps what it measured; jobs matching one of
    ``done_rows`` (an earlier partial file) are not run again. After ``config.max_minutes`` no new
    job starts; the rows not run are left out (``write`` lists them).
    """
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from tqdm.auto import tqdm

    names = mechanisms_of(config)
    jobs = [("mqar", m, n, w) for n in config.lengths for w in config.widths for m in names]
    jobs += [(t, m, None, config.widths[len(config.widths) // 2]) for t in config.extra for m in names]
    earlier = {job_key(r): r for r in done_rows}
    done: dict[int, dict] = {i: earlier[j] for i, j in enumerate(jobs) if j in earlier}
    todo = [i for i in range(len(jobs)) if i not in done]
    bar = tqdm(total=len(jobs), initial=len(done), desc="bench quality", disable=not config.progress)
    deadline = time.monotonic() + 60 * config.max_minutes if config.max_minutes else float("inf")

    def record(i: int, row: dict) -> None:
        done[i] = row
        bar.update(1)
        if partial is not None:
            with open(partial, "w") as f:
                json.dump([done[k] for k in sorted(done)], f, indent=1)

    if config.jobs <= 1:
        for i in todo:
            if time.monotonic() > deadline:
                break
            record(i, run_job(jobs[i], config))
    else:
        with ProcessPoolExecutor(config.jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_job, jobs[i], config): i for i in todo}
            for fut in as_completed(futures):
                if fut.cancelled():
                    continue
                record(futures[fut], fut.result())
                if time.monotonic() > deadline:
                    for other in futures:
                        other.cancel()  # running ones finish; queued ones never start
    bar.close()
    return [done[i] for i in sorted(done)]


def extra_run(kind: str, mechanism: str, width: int, config: QualityConfig) -> dict:
    steps = config.extra_steps
    if kind == "icl":
        task = LinearRegressionICL()
        row = run_one(task, mechanism, width, config, steps, pos="none", mlp_ratio=0)
        row["ridge_mse"] = task.ridge_mse(task.sample(512, seed=EVAL_SEED - config.seed))  # train's eval batch
    elif kind == "algorithmic":
        task = Algorithmic("min", seq_len=8)
        row = run_one(task, mechanism, width, config, steps, [("mse_n16", Algorithmic("min", seq_len=16))],
                      pos="sinusoidal", max_len=16, mlp_ratio=2)
    elif kind == "listops":
        row = run_one(ListOps(), mechanism, width, config, steps, mlp_ratio=2)
    elif kind == "scan_snap":
        row = run_one(ScanSnap(), mechanism, width, config, steps, pos="none", mlp_ratio=2)
    else:
        raise ValueError(f"`extra` tasks must be among {EXTRA_TASKS}; got {kind!r}")
    return dict(row, kind=kind)


def _fmt(row: dict, key: str = "metric", max_steps: int | None = None) -> str:
    if "error" in row:
        return "error"
    value = row.get(key)
    text = "-" if value is None else f"{value:.3f}"
    if max_steps is not None and row.get("steps", max_steps) < max_steps:
        text += f" @{row['steps']}"  # reached the 99% target early
    return text


def markdown(rows: list[dict], config: QualityConfig, command: str) -> str:
    """The tables: MQAR accuracy (mechanism x N, one table per width), then the extra tasks."""
    names = list(dict.fromkeys(r["mechanism"] for r in rows))
    out = ["# attnlab bench quality", "", f"Command: `{command}`", "",
           f"MQAR (Zoology's generator, K = N/16 pairs, vocab {config.vocab_size}), {config.n_layers} layers, "
           f"{config.n_heads} heads, attention only, {config.steps} steps x batch {config.batch_size}, lr {config.lr}, "
           f"seed {config.seed}. Held-out accuracy (fraction of queries answered); in brackets d_model / parameters "
           "(matched to softmax's count at each width). "
           f"A short causal convolution (kernel {config.short_conv}) precedes the first block of every model, "
           "as in Zoology's BaseConv/Based; without it 2-layer attention sits on a long 25% plateau "
           "(induction-head formation) that a CPU budget cannot wait out. Training stops at 99% held-out accuracy "
           "('@k': reached at step k). Runs this short measure how fast a mechanism learns recall as much as "
           "how much it can recall. Paper (Zoology, figure 2): attention 0.97-1.0 at every width 64-512 and "
           "N 64-512 after 64 epochs of 100,000 examples; the efficient mixers it tests fall to <= 0.15 at N=256, "
           "d=64.", ""]
    mqar = [r for r in rows if r.get("seq_len") is not None]
    for w in config.widths:
        out += [f"## MQAR, width {w}", "", "| mechanism | " + " | ".join(f"N={n}" for n in config.lengths) + " | d_model / params |",
                "|---|" + "---|" * (len(config.lengths) + 1)]
        for m in names:
            cells = {r["seq_len"]: r for r in mqar if r["mechanism"] == m and r["width"] == w}
            size = next((f"{r['d_model']} / {r['params']:,}" for r in cells.values() if "params" in r), "-")
            out.append(f"| {m} | " + " | ".join(_fmt(cells[n], max_steps=config.steps) if n in cells else "-" for n in config.lengths) + f" | {size} |")
        out.append("")
    extra = [r for r in rows if r.get("kind")]
    if extra:
        out += ["## Other tasks (middle width)", "",
                "| mechanism | ICL regression mse (ridge) | min n=8 mse (n=16) | ListOps acc | Scan&Snap acc |", "|---|---|---|---|---|"]
        for m in names:
            by = {r["kind"]: r for r in extra if r["mechanism"] == m}
            icl = by.get("icl")
            icl_s = f"{_fmt(icl)} ({icl['ridge_mse']:.3f})" if icl and "ridge_mse" in icl and "error" not in icl else _fmt(icl) if icl else "-"
            alg = by.get("algorithmic")
            alg_s = f"{_fmt(alg)} ({_fmt(alg, 'mse_n16')})" if alg else "-"
            out.append(f"| {m} | {icl_s} | {alg_s} | {_fmt(by['listops']) if 'listops' in by else '-'} | "
                       f"{_fmt(by['scan_snap']) if 'scan_snap' in by else '-'} |")
        out.append("")
    ran = {job_key(r) for r in rows}
    names_all = names
    missing = [f"{m} N={n} w={w}" for n in config.lengths for w in config.widths for m in names_all if ("mqar", m, n, w) not in ran]
    if missing:
        out += ["Not run (time budget): " + ", ".join(missing), ""]
    errors = [r for r in rows if "error" in r]
    if errors:
        out += ["## Errors", ""] + [f"- {r['mechanism']} on {r['task']}: {r['error']}" for r in errors] + [""]
    return "\n".join(out)


def figure(rows: list[dict], config: QualityConfig, path: str) -> None:
    """Accuracy vs N (one panel per width) and vs width (at the N with the most runs), one line per mechanism."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mqar = [r for r in rows if r.get("seq_len") is not None and "error" not in r]
    if not mqar:
        return  # extras only: the tables say it all
    names = list(dict.fromkeys(r["mechanism"] for r in rows))
    colors = {m: plt.cm.tab20(i % 20) for i, m in enumerate(names)}
    panels = len(config.widths) + 1
    fig, axes = plt.subplots(1, panels, figsize=(3.4 * panels + 1.6, 3.4), sharey=True, squeeze=False)
    axes = axes[0]

    def draw(ax, pts, m, ticks):  # categorical x: the swept values, evenly spaced
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot([ticks.index(x) for x in xs], ys, marker="o", color=colors[m], label=m)
        ax.set_xticks(range(len(ticks)), [str(t) for t in ticks])
        ax.set_xlim(-0.3, len(ticks) - 0.7)

    for i, w in enumerate(config.widths):
        for m in names:
            draw(axes[i], [(r["seq_len"], r["metric"]) for r in mqar if r["mechanism"] == m and r["width"] == w], m,
                 config.lengths)
        axes[i].set(title=f"width {w}", xlabel="sequence length N")
    n_best = max(config.lengths, key=lambda n: sum(r["seq_len"] == n for r in mqar))
    for m in names:
        draw(axes[-1], [(r["width"], r["metric"]) for r in mqar if r["mechanism"] == m and r["seq_len"] == n_best], m,
             config.widths)
    axes[-1].set(title=f"N={n_best}", xlabel="width (softmax d_model)")
    axes[0].set_ylabel("MQAR accuracy")
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / (3.4 * panels + 1.6), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows: list[dict], config: QualityConfig, out_dir: str, command: str, seconds: float) -> dict[str, str]:
    """quality.json, quality.md and quality.png under ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"quality.{ext}") for ext in ("json", "md", "png")}
    meta = dict(command=command, config=asdict(config), seconds=round(seconds, 1), torch=torch.__version__,
                threads=torch.get_num_threads(), mechanisms=list(MECHANISMS))
    with open(paths["json"], "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(rows, config, command) + f"\nTotal {seconds / 60:.1f} min on {config.device}.\n")
    figure(rows, config, paths["png"])
    return {k: v for k, v in paths.items() if os.path.exists(v)}


def main(args: argparse.Namespace) -> int:
    config = quick_config() if args.quick else QualityConfig()
    for name in ("mechanisms", "lengths", "widths", "steps", "extra", "extra_steps", "lr", "seed", "device", "n_heads",
                 "jobs", "vocab_size", "max_minutes"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    config.progress = not args.no_progress
    mechanisms_of(config)
    command = "attnlab bench quality " + " ".join(shlex.quote(a) for a in sys.argv[3:]) if sys.argv[1:3] == ["bench", "quality"] \
        else "attnlab bench quality"
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    partial = os.path.join(args.out, "quality.partial.json")
    earlier = json.load(open(partial)) if args.resume and os.path.exists(partial) else []
    rows = sweep(config, partial=partial, done_rows=earlier)
    os.remove(partial)
    paths = write(rows, config, args.out, command.strip(), time.perf_counter() - start)
    print(markdown(rows, config, command.strip()))
    print("wrote", ", ".join(paths.values()))
    return 0


def add_parser(subparsers) -> None:
    """Register ``attnlab bench quality``."""
    p = subparsers.add_parser("quality", help="train every mechanism on MQAR and other synthetic tasks at equal budget")
    p.add_argument("--quick", action="store_true", help="N=32, one width, short runs: a few minutes on 2 CPU cores")
    p.add_argument("--mechanisms", nargs="+", default=None, help="registered names (default: all)")
    p.add_argument("--lengths", type=int, nargs="*", default=None, help="MQAR sequence lengths (even, >= 16; none: skip MQAR)")
    p.add_argument("--widths", type=int, nargs="+", default=None, help="softmax d_model per budget")
    p.add_argument("--steps", type=int, default=None, help="training steps per MQAR run")
    p.add_argument("--extra", nargs="*", default=None, choices=EXTRA_TASKS, help="other tasks (none: MQAR only)")
    p.add_argument("--extra-steps", type=int, default=None, help="training steps per other-task run")
    p.add_argument("--n-heads", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None, help="MQAR vocabulary (default 256)")
    p.add_argument("--jobs", type=int, default=None, help="parallel training processes (default 1)")
    p.add_argument("--max-minutes", type=float, default=None, help="start no new run after this many minutes")
    p.add_argument("--resume", action="store_true", help="reuse the rows of OUT/quality.partial.json (same settings)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--out", default="benchmarks/results", help="folder for quality.json/.md/.png")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
