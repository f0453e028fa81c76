"""Evaluate a causal LM on a named task: `attnlab eval --task passkey --length 2048 --samples 5`.

`TASKS` maps each name to a `Task`: its generator, its scorer, and how to get a prediction
(greedy decoding by default). Other task families (few-shot classification, ...) join by adding
an entry; a `Task` with `needs_length=False` is called without `length`, and one with its own
`predict` may score label words instead of generating.
"""
from __future__ import annotations

import argparse
import inspect
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from .tasks import (
    Sample,
    exact_match,
    make_common_words,
    make_multikey,
    make_multivalue,
    make_needle,
    make_passkey,
    make_variable_tracking,
    string_match_all,
    wilson_interval,
)


def greedy_generate(model, tokenizer, sample: Sample, max_new_tokens: int, **generate_kwargs) -> str:
    """Greedy-decode up to `max_new_tokens` after `sample.input_ids` (batch 1); the new text only."""
    ids = torch.tensor([sample.input_ids], dtype=torch.long, device=model.device)  # (1, T)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=pad, **generate_kwargs,
        )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@dataclass(frozen=True)
class Task:
    """A named evaluation: `make` builds samples, `predict` answers one, `score` grades it in [0, 1]."""

    make: Callable[..., list[Sample]]
    score: Callable[[str, Sequence[str]], float]
    max_new_tokens: int  # enough for the longest answer of the task, plus a little
    description: str
    predict: Callable[..., str] = greedy_generate
    needs_length: bool = True


TASKS: dict[str, Task] = {
    "passkey": Task(make_passkey, exact_match, 16, "passkey retrieval (Landmark Attention template)"),
    "needle": Task(make_needle, string_match_all, 20, "one key -> 7-digit number needle at a depth"),
    "multikey": Task(make_multikey, string_match_all, 20, "4 key -> number needles, one asked (RULER)"),
    "multivalue": Task(make_multivalue, string_match_all, 64, "4 numbers for one key, all asked (RULER)"),
    "variable_tracking": Task(make_variable_tracking, string_match_all, 40, "4-hop VAR chain (RULER vt)"),
    "common_words": Task(make_common_words, string_match_all, 80, "10 most frequent words (RULER cwe)"),
}


@dataclass
class EvalResult:
    """Scores of one task at one length. `accuracy` is the mean score; `ci95` its Wilson interval."""

    task: str
    length: int | None
    n_samples: int
    seed: int
    score_sum: float
    accuracy: float
    ci95: tuple[float, float]
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        lo, hi = self.ci95
        n_ok = f"{self.score_sum:g}/{self.n_samples}"
        at = f" length={self.length}" if self.length is not None else ""
        at += "".join(f" {k}={v}" for k, v in self.params.items())
        return (f"{self.task}{at} samples={self.n_samples} accuracy={self.accuracy:.3f} ({n_ok}) "
                f"95% CI [{lo:.3f}, {hi:.3f}]  {self.seconds:.1f} s")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def get_task(name: str) -> Task:
    """The registered task called `name`; ValueError listing the known names otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name=}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def model_context(model) -> int | None:
    """The longest sequence the model's positions support, from its config (None if unknown)."""
    return getattr(model.config, "max_position_embeddings", None)


def check_eval_args(
    task: str, model, length: int | None, n_samples: int, seed: int, max_new_tokens: int | None,
    params: dict[str, Any],
) -> tuple[Task, dict[str, Any], int]:
    """Validate an evaluation before any work; returns (task, generator kwargs, max_new_tokens)."""
    spec = get_task(task)
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples <= 0:
        raise ValueError(f"`n_samples` must be a positive integer; got {n_samples=}")
    new_tokens = spec.max_new_tokens if max_new_tokens is None else max_new_tokens
    if not isinstance(new_tokens, int) or new_tokens <= 0:
        raise ValueError(f"`max_new_tokens` must be a positive integer; got {max_new_tokens=}")
    make_kwargs: dict[str, Any] = dict(n_samples=n_samples, seed=seed, **params)
    if spec.needs_length:
        if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
            raise ValueError(f"task {task!r} needs a positive `length` in tokens; got {length=}")
        ctx = model_context(model)
        if ctx is not None and length + new_tokens > ctx:
            raise ValueError(
                f"{length=} plus max_new_tokens={new_tokens} exceeds the model's context of {ctx} tokens"
            )
        make_kwargs["length"] = length
    _check_params(task, spec.make, params)
    return spec, make_kwargs, new_tokens


def evaluate(
    task: str,
    model,
    tokenizer,
    length: int | None,
    n_samples: int,
    seed: int = 0,
    *,
    max_new_tokens: int | None = None,
    progress: bool = True,
    generate_kwargs: dict[str, Any] | None = None,
    **params,
) -> EvalResult:
    """Generate `n_samples` of `task` at `length` tokens, answer each (batch 1), and score them.

    Args:
        task: a name in `TASKS`.
        model, tokenizer: a causal LM and its tokenizer (`attnlab.hf.load()`).
        length: prompt length in tokens; prompt plus `max_new_tokens` must fit the model's context.
        n_samples: how many samples (> 0).
        seed: generator seed; the same seed gives the same prompts.
        max_new_tokens: generation budget; None uses the task's default.
        progress: show a tqdm progress bar.
        generate_kwargs: passed on to `model.generate` (e.g. a cache).
        **params: task parameters (`depth`, `haystack`, `n_keys`, ...), checked against the generator.
    """
    spec, make_kwargs, new_tokens = check_eval_args(
        task, model, length, n_samples, seed, max_new_tokens, params
    )
    start = time.perf_counter()
    samples = spec.make(tokenizer, **make_kwargs)
    records, total = [], 0.0
    bar = samples
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(samples, desc=f"{task} {length or ''}".strip(), unit="sample")
    for s in bar:
        pred = spec.predict(model, tokenizer, s, new_tokens, **(generate_kwargs or {}))
        score = float(spec.score(pred, s.answers))
        total += score
        records.append(dict(prediction=pred, answers=list(s.answers), score=score,
                            prompt_tokens=len(s.input_ids), **_plain(s.metadata)))
        if progress:
            bar.set_postfix(acc=f"{total / len(records):.2f}")
    return EvalResult(task, length, n_samples, seed, total, total / n_samples,
                      wilson_interval(total, n_samples), time.perf_counter() - start,
                      params=_plain(params), records=records)


def _check_params(task: str, make: Callable, params: dict[str, Any]) -> None:
    accepted = {n for n, p in inspect.signature(make).parameters.items() if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"task {task!r} takes no parameter(s) {unknown}; it takes {sorted(accepted)}")


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy: values that are not plain data become strings."""
    return json.loads(json.dumps(d, default=str))


# ---------------------------------------------------------------- CLI


def _param(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    return key, {"true": True, "false": False, "none": None}.get(raw.lower(), raw)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `attnlab eval`."""
    p = subparsers.add_parser(
        "eval", help="accuracy of a model on a generated task, with a 95%% confidence interval",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", required=True, help=f"one of: {', '.join(sorted(TASKS))}")
    p.add_argument("--length", type=int, nargs="+",
                   help="prompt length(s) in tokens; several give a grid with --depth")
    p.add_argument("--samples", type=int, default=5, help="number of samples (default 5)")
    p.add_argument("--model", default=None, help="smollm2 (default), a local HF model dir or a .gguf file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--depth", type=float, nargs="+",
                   help="needle depth(s) in [0, 1] (passkey, needle); default random per sample")
    p.add_argument("--haystack", choices=("kjv", "noise"), help="filler text (needle-style tasks)")
    p.add_argument("--max-new-tokens", type=int, help="generation budget (default: the task's)")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="any other task parameter, e.g. --param n_keys=8 (repeatable)")
    p.add_argument("--json", metavar="PATH", help="also write the result, with every prediction, as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    params = dict(args.param)
    if args.haystack is not None:
        params["haystack"] = args.haystack
    # One evaluation per (length, depth) cell: NIAH's grid when several of each are given.
    cells = [(L, params if d is None else dict(params, depth=d))
             for L in (args.length or [None]) for d in (args.depth or [None])]
    try:
        get_task(args.task)  # fail on a bad name or count before loading the model
        if args.samples <= 0:
            raise ValueError(f"--samples must be a positive integer; got {args.samples}")
        from .hf import load

        model, tokenizer = load(args.model)
        for L, cell in cells:  # check every cell, with one cheap sample each, before any model run
            spec, make_kwargs, _ = check_eval_args(
                args.task, model, L, args.samples, args.seed, args.max_new_tokens, cell
            )
            spec.make(tokenizer, **dict(make_kwargs, n_samples=1))
        results = []
        for L, cell in cells:
            r = evaluate(args.task, model, tokenizer, L, args.samples, args.seed,
                         max_new_tokens=args.max_new_tokens, progress=not args.no_progress, **cell)
            print(r.summary(), flush=True)
            results.append(r.to_dict())
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model or "smollm2", results=results), f, indent=2)
    return 0
