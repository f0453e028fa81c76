"""Evaluate a causal LM on a named task: `attnlab eval --task passkey --length 2048 --samples 5`.

`TASKS` maps each name to a `Task`: its generator, its scorer, and how to get a prediction
(greedy decoding by default). Other task families join by adding an entry; a `Task` with
`needs_length=False` is called without `length`, and one with its own `predict` may score label
words instead of generating.

Few-shot classification (`attnlab eval --task sst2 --shots 4 --intervention act`; tasks in
`attnlab.tasks.classification.CLASSIFICATION_TASKS`) runs through `evaluate_classification`: label-word
log-likelihood accuracy, uncalibrated and contextually calibrated, with bootstrap 95% intervals on the
test split; with an intervention, its hyperparameters are chosen on the dev split and the paired
delta against the unmodified model on the same test prompts is reported.
"""
from __future__ import annotations

import argparse
import inspect
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
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
from .interventions._calibrate import left_padded, positions
from .tasks.classification import (
    CLASSIFICATION_TASKS,
    bootstrap_ci,
    build_prompt,
    calibrated_predictions,
    class_log_likelihoods,
    content_free_probs,
    content_free_prompts,
    get_classification_task,
    label_token_ids,
    paired_bootstrap_ci,
    sample_demonstrations,
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
        raise ValueError(f"unknown task {name=}; known tasks: {', '.join(sorted(TASKS))}; "
                         f"classification tasks: {', '.join(sorted(CLASSIFICATION_TASKS))}")
    return TASKS[name]


def resolve_device(name: str | None) -> torch.device:
    """``--device``: "cpu", "cuda", "cuda:N" or "auto" (cuda when available, else cpu)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto; got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    return device


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


# ---------------------------------------------------------------- few-shot classification


@dataclass
class PromptSet:
    """The prompts of one split, all with the same demonstrations.

    Attributes:
        rows: indices of the scored rows in the split (a fixed random subset, the same for every seed).
        labels: (N,) their classes.
        prompts: token ids of each row's prompt.
        content_free: token ids of the content-free prompts ("N/A", "", "[MASK]").
        split_size: rows in the whole split.
    """

    task: str
    split: str
    rows: list[int]
    labels: np.ndarray
    prompts: list[list[int]]
    content_free: list[list[int]]
    split_size: int


def classification_prompts(task: str, tokenizer, split: str, shots: int, seed: int, n_samples: int | None,
                           context: int | None = None) -> PromptSet:
    """Prompts for `n_samples` rows of `split` (None: all), `shots` demonstrations drawn with `seed`.

    Raises:
        ValueError: bad counts, or a prompt (plus its longest label) longer than `context` tokens.
    """
    spec = get_classification_task(task)
    if n_samples is not None and (not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples <= 0):
        raise ValueError(f"`n_samples` must be a positive integer or None; got {n_samples=}")
    demos = sample_demonstrations(spec.read("train"), shots, seed)
    data = spec.read(split)
    # The rows do not depend on `seed`: seeds vary the demonstrations, on the same rows.
    rows = sorted(random.Random(len(data)).sample(range(len(data)), min(n_samples or len(data), len(data))))
    prompts = [tokenizer(build_prompt(spec, demos, data[i].fields))["input_ids"] for i in rows]
    cf = [tokenizer(p)["input_ids"] for p in content_free_prompts(spec, demos)]
    if context is not None:
        label_len = max(len(w) for words in label_token_ids(spec, tokenizer) for w in words)
        longest = max(len(p) for p in prompts + cf) + label_len
        if longest > context:
            raise ValueError(f"{shots=} is too many for {task}: the longest prompt plus label has {longest} tokens, "
                             f"over the model's context of {context}")
    return PromptSet(task, split, rows, np.array([data[i].label for i in rows]), prompts, cf, len(data))


def score_prompts(model, tokenizer, ps: PromptSet, progress: bool = False,
                  desc: str = "", batch_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Class log-likelihoods of every prompt, (N, C), and of the content-free prompts, (K, C).

    ``batch_size`` > 1 scores left-padded batches (:func:`batched_class_log_likelihoods`) when every
    label word is one token; the numbers then match batch 1 up to float32 rounding.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1; got {batch_size=!r}")
    label_ids = label_token_ids(get_classification_task(ps.task), tokenizer)
    if batch_size > 1 and all(len(w) == 1 for words in label_ids for w in words):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ll = batched_class_log_likelihoods(model, ps.prompts, label_ids, batch_size, pad)
        return ll, batched_class_log_likelihoods(model, ps.content_free, label_ids, batch_size, pad)
    items = ps.prompts
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(items, desc=desc or f"{ps.task} {ps.split}", unit="prompt", leave=False)
    ll = np.array([class_log_likelihoods(model, p, label_ids) for p in items])
    cf = np.array([class_log_likelihoods(model, p, label_ids) for p in ps.content_free])
    return ll, cf


def batched_class_log_likelihoods(model, prompts: Sequence[Sequence[int]], label_ids, batch_size: int,
                                  pad_id: int = 0) -> np.ndarray:
    """(N, C) float64 class log-likelihoods of one-token label words, ``batch_size`` prompts per forward.

    Prompts are sorted by length (little padding) and left-padded; position ids count real tokens
    only, so each row sees what it sees at batch 1. Label words must be single tokens
    (``label_ids[c][w] == [token]``).
    """
    flat = [w[0] for words in label_ids for w in words]
    sizes = [len(words) for words in label_ids]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = np.zeros((len(prompts), len(label_ids)))
    device = model.device
    cols = torch.tensor(flat, device=device)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask = left_padded([prompts[i] for i in rows], pad_id, device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False,
                           logits_to_keep=1).logits
        words = logits[:, -1].float().log_softmax(-1)[:, cols].double().cpu()  # (b, words)
        per_class = torch.stack([torch.logsumexp(part, 1) for part in words.split(sizes, 1)], 1)  # (b, C)
        out[rows] = per_class.numpy()
    return out


@dataclass
class Scores:
    """Accuracy of one model state on one PromptSet, uncalibrated and calibrated, with bootstrap 95% CIs."""

    uncalibrated: float
    uncalibrated_ci: tuple[float, float]
    calibrated: float
    calibrated_ci: tuple[float, float]
    p_cf: list[float]
    correct: list[int] = field(repr=False)  # per row, uncalibrated
    correct_calibrated: list[int] = field(repr=False)
    log_likelihoods: list[list[float]] = field(repr=False)

    @classmethod
    def of(cls, ll: np.ndarray, cf: np.ndarray, labels: np.ndarray, n_boot: int = 2000) -> "Scores":
        p_cf = content_free_probs(cf)
        ok = (ll.argmax(1) == labels).astype(int)
        ok_cal = (calibrated_predictions(ll, p_cf) == labels).astype(int)
        return cls(float(ok.mean()), bootstrap_ci(ok, n_boot), float(ok_cal.mean()), bootstrap_ci(ok_cal, n_boot),
                   p_cf.tolist(), ok.tolist(), ok_cal.tolist(), ll.tolist())

    def line(self) -> str:
        (a, b), (c, d) = self.uncalibrated_ci, self.calibrated_ci
        return (f"uncalibrated {self.uncalibrated:.3f} [{a:.3f}, {b:.3f}]  "
                f"calibrated {self.calibrated:.3f} [{c:.3f}, {d:.3f}]")


@dataclass
class ClassificationResult:
    """A few-shot classification run; with an intervention, the paired delta against the plain model.

    `delta` holds "uncalibrated"/"calibrated" mean differences (modified - baseline, same prompts) and
    their paired-bootstrap 95% intervals; `dev` the hyperparameter search (rows of dev accuracies).
    """

    task: str
    shots: int
    seed: int
    split: str
    n_samples: int
    split_size: int
    baseline: Scores
    seconds: float
    intervention: str | None = None
    hyper: dict[str, Any] | None = None
    modified: Scores | None = None
    delta: dict[str, Any] | None = None
    dev: dict[str, Any] | None = None

    def summary(self) -> str:
        lines = [f"{self.task} shots={self.shots} seed={self.seed} {self.split} split: {self.n_samples} of "
                 f"{self.split_size} rows  {self.seconds:.1f} s",
                 f"  {'baseline':<22} {self.baseline.line()}"]
        if self.modified is not None:
            d = self.delta
            lines.append(f"  {self.intervention:<22} {self.modified.line()}  hyper={self.hyper}")
            lines.append(f"  {'delta':<22} uncalibrated {d['uncalibrated']:+.3f} [{d['uncalibrated_ci'][0]:+.3f}, "
                         f"{d['uncalibrated_ci'][1]:+.3f}]  calibrated {d['calibrated']:+.3f} "
                         f"[{d['calibrated_ci'][0]:+.3f}, {d['calibrated_ci'][1]:+.3f}]  (paired bootstrap)")
        if self.dev:
            lines.append(f"  hyperparameters chosen on the {self.dev['split']} split ({self.dev['n_samples']} of "
                         f"{self.dev['split_size']} rows) by {self.dev['select_by']} accuracy:")
            for row in self.dev["table"]:
                lines.append(f"    {str(row['hyper']):<40} uncalibrated {row['uncalibrated']:.3f}  "
                             f"calibrated {row['calibrated']:.3f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))


def get_intervention(intervention):
    """An `attnlab.interventions.Intervention`, or the registered one of that name."""
    from .interventions import INTERVENTIONS, Intervention

    if isinstance(intervention, Intervention):
        return intervention
    if intervention not in INTERVENTIONS:
        raise ValueError(f"unknown {intervention=}; known: {', '.join(sorted(INTERVENTIONS))}")
    return INTERVENTIONS[intervention]


def scores_with(spec, hyper: dict[str, Any], model, tokenizer, ps: PromptSet, calibration: list[list[int]],
                progress: bool = False, desc: str = "", n_boot: int = 2000, batch_size: int = 1) -> Scores:
    """Scores of `ps` with the intervention `spec` applied with `hyper` (detached afterwards, even on error)."""
    try:
        handle = spec.apply(model, tokenizer, calibration, **hyper)
    except TypeError as err:  # a missing or unknown keyword: the user's --hyper, so say it plainly
        raise ValueError(f"the intervention does not take hyperparameters {hyper}: {err}") from None
    try:
        ll, cf = score_prompts(model, tokenizer, ps, progress, desc, batch_size)
    finally:
        handle.detach()
    return Scores.of(ll, cf, ps.labels, n_boot)


def evaluate_classification(
    task: str,
    model,
    tokenizer,
    shots: int = 4,
    n_samples: int | None = 200,
    seed: int = 0,
    *,
    intervention=None,
    hyper: dict[str, Any] | None = None,
    dev_samples: int | None = 100,
    select_by: str = "uncalibrated",
    n_calibration: int = 32,
    n_boot: int = 2000,
    progress: bool = True,
) -> ClassificationResult:
    """Few-shot accuracy on the test split; with an intervention, also the paired delta against no intervention.

    The intervention's hyperparameters are chosen among `grid` (each candidate updated with `hyper`)
    by dev-split accuracy (`select_by`); the dev split is disjoint from the reported test split and
    from the demonstrations (data README). A one-candidate grid skips the search. The intervention's
    `calibration` prompts are the first `n_calibration` dev prompts.

    Args:
        task: a name in `CLASSIFICATION_TASKS`.
        model, tokenizer: a causal LM (`attnlab.hf.load()`).
        shots: demonstrations per prompt, drawn from the train split with `seed`.
        n_samples: test rows scored (a fixed random subset; None: all).
        intervention: None, a name in `attnlab.interventions.INTERVENTIONS`, or an `Intervention`.
        hyper: fixed hyperparameters added to every grid candidate (e.g. `heads` for head_mask).
        dev_samples: dev rows for the hyperparameter search (None: all).
        select_by: "uncalibrated" or "calibrated".
        n_boot: bootstrap resamples for every interval.
    """
    if select_by not in ("uncalibrated", "calibrated"):
        raise ValueError(f"`select_by` must be 'uncalibrated' or 'calibrated'; got {select_by=}")
    spec = get_intervention(intervention) if intervention is not None else None
    start = time.perf_counter()
    ctx = model_context(model)
    test = classification_prompts(task, tokenizer, "test", shots, seed, n_samples, ctx)
    result = ClassificationResult(task, shots, seed, "test", len(test.rows), test.split_size, None, 0.0)
    modified = None
    if spec is not None:
        name = intervention if isinstance(intervention, str) else spec.description
        candidates = [dict(g, **(hyper or {})) for g in spec.grid] or [dict(hyper or {})]
        dev = classification_prompts(task, tokenizer, "dev", shots, seed, dev_samples, ctx)
        calibration = dev.prompts[:n_calibration]
        chosen = candidates[0]
        if len(candidates) > 1:
            chosen, result.dev = choose_hyper(spec, candidates, model, tokenizer, dev, calibration, select_by,
                                              progress, n_boot)
        modified = scores_with(spec, chosen, model, tokenizer, test, calibration, progress,
                               f"{task} test {name}", n_boot)
        result.intervention, result.hyper = name, chosen
    ll, cf = score_prompts(model, tokenizer, test, progress, f"{task} test baseline")
    result.baseline = Scores.of(ll, cf, test.labels, n_boot)
    if modified is not None:
        result.modified = modified
        result.delta = paired_delta(result.baseline, modified, n_boot)
    result.seconds = time.perf_counter() - start
    return result


def choose_hyper(spec, candidates: list[dict[str, Any]], model, tokenizer, dev: PromptSet,
                 calibration: list[list[int]], select_by: str = "uncalibrated", progress: bool = False,
                 n_boot: int = 2000, dev_baseline: Scores | None = None,
                 batch_size: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """The candidate with the best `select_by` accuracy on `dev` (ties: the earlier), and the search table.

    The table's first row is the unmodified model on the same dev prompts, for reference (scored
    here unless `dev_baseline` gives it).
    """
    table = []
    for i, hp in enumerate(candidates):
        desc = f"dev {i + 1}/{len(candidates)}"
        s = scores_with(spec, hp, model, tokenizer, dev, calibration, progress, desc, n_boot, batch_size)
        table.append(dict(hyper=hp, uncalibrated=s.uncalibrated, calibrated=s.calibrated))
    best = max(range(len(table)), key=lambda i: (table[i][select_by], -i))  # ties: the earlier candidate
    base = dev_baseline
    if base is None:
        ll, cf = score_prompts(model, tokenizer, dev, progress, "dev baseline", batch_size)
        base = Scores.of(ll, cf, dev.labels, n_boot)
    table.insert(0, dict(hyper="baseline (no intervention)", uncalibrated=base.uncalibrated,
                         calibrated=base.calibrated))
    info = dict(split=dev.split, n_samples=len(dev.rows), split_size=dev.split_size, select_by=select_by, table=table)
    return candidates[best], info


def paired_delta(base: Scores, mod: Scores, n_boot: int = 2000) -> dict[str, Any]:
    """mean(mod - base) per metric, with a paired-bootstrap 95% interval (same rows resampled for both)."""
    out = {}
    for key, a, b in (("uncalibrated", base.correct, mod.correct),
                      ("calibrated", base.correct_calibrated, mod.correct_calibrated)):
        out[key] = float(np.mean(b) - np.mean(a))
        out[f"{key}_ci"] = paired_bootstrap_ci(a, b, n_boot)
    return out


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
    p.add_argument("--task", required=True,
                   help=f"long-context: {', '.join(sorted(TASKS))}; few-shot classification: "
                        f"{', '.join(sorted(CLASSIFICATION_TASKS))}")
    p.add_argument("--length", type=int, nargs="+",
                   help="prompt length(s) in tokens; several give a grid with --depth")
    p.add_argument("--samples", type=int, default=None,
                   help="number of samples (default 5; classification: 200 test rows)")
    p.add_argument("--model", default=None, help="smollm2 (default), a local HF model dir or a .gguf file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--depth", type=float, nargs="+",
                   help="needle depth(s) in [0, 1] (passkey, needle); default random per sample")
    p.add_argument("--haystack", choices=("kjv", "noise"), help="filler text (needle-style tasks)")
    p.add_argument("--max-new-tokens", type=int, help="generation budget (default: the task's)")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="any other task parameter, e.g. --param n_keys=8 (repeatable)")
    c = p.add_argument_group("few-shot classification (sst2, agnews, trec, cb, rte)")
    c.add_argument("--shots", type=int, default=None, help="demonstrations per prompt (default 4)")
    c.add_argument("--intervention", help="an entry of attnlab.interventions.INTERVENTIONS; adds the paired delta")
    c.add_argument("--hyper", type=_hyper, action="append", default=[], metavar="KEY=JSON",
                   help="fixed intervention argument, e.g. --hyper 'heads=[[3, 1]]' (repeatable)")
    c.add_argument("--dev-samples", type=int, default=100,
                   help="dev rows for choosing the intervention's hyperparameters (default 100)")
    c.add_argument("--select-by", choices=("uncalibrated", "calibrated"), default="uncalibrated",
                   help="dev accuracy that picks the hyperparameters (default uncalibrated)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto (long-context tasks)")
    p.add_argument("--json", metavar="PATH", help="also write the result, with every prediction, as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
    return p


def _hyper(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return _param(text)


def _run_classification(args: argparse.Namespace) -> int:
    try:
        stray = [f"--{n.replace('_', '-')}" for n in ("length", "depth", "haystack", "max_new_tokens")
                 if getattr(args, n) is not None] + (["--param"] if args.param else [])
        if stray:
            raise ValueError(f"{', '.join(stray)} do not apply to the classification task {args.task!r}")
        shots = 4 if args.shots is None else args.shots
        samples = 200 if args.samples is None else args.samples
        if samples <= 0 or shots < 0 or args.dev_samples <= 0:
            raise ValueError(f"--samples and --dev-samples must be positive and --shots >= 0; "
                             f"got {samples}, {args.dev_samples}, {shots}")
        if args.intervention is not None:
            get_intervention(args.intervention)
        elif args.hyper:
            raise ValueError("--hyper needs --intervention")
        from .hf import load

        model, tokenizer = load(args.model)
        r = evaluate_classification(args.task, model, tokenizer, shots, samples, args.seed,
                                    intervention=args.intervention, hyper=dict(args.hyper) or None,
                                    dev_samples=args.dev_samples, select_by=args.select_by,
                                    progress=not args.no_progress)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(r.summary(), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model or "smollm2", results=[r.to_dict()]), f, indent=2)
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.task in CLASSIFICATION_TASKS:
        return _run_classification(args)
    if args.shots is not None or args.intervention is not None or args.hyper:
        raise SystemExit(f"error: --shots, --intervention and --hyper apply to classification tasks only, "
                         f"not {args.task!r}")
    args.samples = 5 if args.samples is None else args.samples
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

        device = resolve_device(args.device)
        model, tokenizer = load(args.model)
        model.to(device)
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
