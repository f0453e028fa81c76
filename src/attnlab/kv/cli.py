"""`attnlab kv eval` and `attnlab kv sweep`: KV-cache policies on the long-context tasks.

    attnlab kv eval --policy razor --budget 0.3 --task needle --length 4096 --samples 10
    attnlab kv sweep --task needle multikey --length 4096 --budgets 0.1 0.2 0.3 0.5 --out DIR

eval prints accuracy (Wilson 95% CI), kept KV bytes vs a full cache, prefill and decode tokens/s,
next to the full cache on the same samples (one shared prefill; --no-full skips it). sweep runs every
policy at every budget and writes DIR/kv_sweep.json, DIR/kv_sweep.md and DIR/kv_sweep.png (accuracy
vs kept KV bytes, one panel per task).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from . import POLICIES


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `attnlab kv` with its `eval` and `sweep` subcommands."""
    p = subparsers.add_parser("kv", help="KV-cache policies: accuracy vs kept bytes, speed",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kv_command", required=True)

    e = sub.add_parser("eval", help="one policy at one budget on one task")
    e.add_argument("--policy", required=True, help=f"one of: {', '.join(POLICIES)}")
    e.add_argument("--budget", type=float, default=1.0, help="fraction of KV bytes kept, in (0, 1]")
    e.add_argument("--no-full", action="store_true", help="do not also run the full cache on the same samples")
    _common(e)
    e.set_defaults(func=_run_eval)

    s = sub.add_parser("sweep", help="every policy at every budget: JSON, markdown and a PNG figure")
    s.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    s.add_argument("--policies", nargs="+", default=list(POLICIES), help="default: all")
    s.add_argument("--out", default="kv_sweep", help="output directory (default ./kv_sweep)")
    _common(s, several_tasks=True)
    s.set_defaults(func=_run_sweep)
    return p


def _common(p: argparse.ArgumentParser, several_tasks: bool = False) -> None:
    from ..eval import TASKS

    p.add_argument("--task", required=True, nargs="+" if several_tasks else None,
                   help=f"one of: {', '.join(sorted(TASKS))}")
    p.add_argument("--length", type=int, required=True, help="prompt length in tokens")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="smollm2 (default) or a local HF model directory")
    p.add_argument("--max-new-tokens", type=int, help="generation budget (default: the task's)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--batch", type=int, default=1,
                   help="prompts per forward (left-padded); with B > 1 decode tokens/s is the batch's throughput")
    p.add_argument("--json", metavar="PATH", help="write every result and prediction as JSON")
    p.add_argument("--no-progress", action="store_true")


def _check(args, names, budgets) -> list:
    from ..eval import get_task
    from .evaluate import policies_for

    tasks = args.task if isinstance(args.task, list) else [args.task]
    for t in tasks:
        get_task(t)
    if args.samples <= 0:
        raise ValueError(f"--samples must be a positive integer; got {args.samples}")
    if args.batch <= 0:
        raise ValueError(f"--batch must be a positive integer; got {args.batch}")
    for n in names:
        if n not in POLICIES:
            raise ValueError(f"unknown KV policy {n!r}; known policies: {', '.join(POLICIES)}")
    return policies_for(names, budgets)


def _run_eval(args) -> int:
    from .evaluate import evaluate_policies

    try:
        names = [args.policy] if args.no_full or args.policy == "full" else ["full", args.policy]
        budgets = [args.budget]
        if args.policy == "full" and args.budget != 1.0:
            raise ValueError(f"the full policy keeps everything: --budget must be 1; got {args.budget}")
        policies = _check(args, names, budgets)
        model, tok = _load(args)
        from . import check_model

        check_model(model)
        results = evaluate_policies(model, tok, policies, args.task, args.length, args.samples, args.seed,
                                    max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
                                    batch_size=args.batch)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    for r in results:
        print(r.summary())
    if args.json:
        _write_json(Path(args.json), args, results)
    return 0


def _run_sweep(args) -> int:
    from .evaluate import evaluate_policies

    try:
        policies = _check(args, args.policies, args.budgets)
        model, tok = _load(args)
        from . import check_model

        check_model(model)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        results = []
        for task in args.task:
            rs = evaluate_policies(model, tok, policies, task, args.length, args.samples, args.seed,
                                   max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
                                   checkpoint=out / f"partial_{task}.json", batch_size=args.batch)
            for r in rs:
                print(r.summary(), flush=True)
            results += rs
            _write_json(out / "kv_sweep.json", args, results)  # after each task: a crash keeps what is done
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if args.json:
        _write_json(Path(args.json), args, results)
    from .figures import sweep_figure, sweep_table

    sweep_figure(results, out / "kv_sweep.png", title=f"{args.model or 'SmolLM2-135M'} at {args.length} tokens")
    (out / "kv_sweep.md").write_text(sweep_table(results, command=_command()))
    print(f"wrote {out / 'kv_sweep.json'}, {out / 'kv_sweep.md'}, {out / 'kv_sweep.png'}")
    return 0


def _load(args):
    """The model (moved to ``--device``) and its tokenizer."""
    from ..eval import resolve_device
    from ..hf import load

    device = resolve_device(args.device)
    model, tok = load(args.model)
    return model.to(device), tok


def _command() -> str:
    return "attnlab " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "attnlab kv sweep"


def _write_json(path: Path, args, results) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in vars(args).items() if k != "func"}
    path.write_text(json.dumps(dict(command=_command(), args=meta, results=[r.to_dict() for r in results]),
                               indent=1, default=str))
