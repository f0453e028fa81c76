"""Few-shot in-context classification scored by label-word log-likelihood, with contextual calibration.

Prompts, label words and content-free inputs follow "Calibrate Before Use: Improving Few-Shot
Performance of Language Models" (Zhao et al., 2021, https://arxiv.org/abs/2102.09690): an
instruction line (AG News, TREC), then k demonstrations "<q_prefix><input>\\n<a_prefix> <label>\\n\\n"
drawn at random (seeded) from the task's train split, then the query with its answer prefix. The
model scores each class by the summed log-probability of its label tokens after the prompt. The
calibrated prediction divides the class probabilities by those the same prompt gives a content-free
input ("N/A", "", "[MASK]") and takes the argmax. Chat templates are not used: the label words are
scored right after the plain prompt, as in the paper.

Data: `attnlab/data/classification/` (README there: sources, rows kept, the train/dev/test splits).
"""
from __future__ import annotations

import csv
import functools
import io
import json
import random
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Sequence

import numpy as np
import torch

SPLITS = ("train", "dev", "test")
CONTENT_FREE = ("N/A", "", "[MASK]")


@dataclass(frozen=True)
class Example:
    """One labelled row: `fields` is (sentence,) or (premise, hypothesis); `label` a class index."""

    fields: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class ClassificationTask:
    """A few-shot classification task in the "Calibrate Before Use" prompt format.

    Attributes:
        name: registry key.
        labels: per class, its label words; the first is written in demonstrations, all are scored
            (a class's likelihood is the sum over its words, e.g. AG News "Technology" or "Science").
        instruction: text before the first demonstration ("" for none).
        q_prefix: written before each input.
        a_prefix: the answer prefix, without the space that starts the label word.
        template: `str.format` pattern turning an example's fields into the input text.
        read: split name -> the split's examples.
    """

    name: str
    labels: tuple[tuple[str, ...], ...]
    instruction: str
    q_prefix: str
    a_prefix: str
    template: str
    read: Callable[[str], list[Example]]
    description: str

    @property
    def n_fields(self) -> int:
        return self.template.count("{")


# ---------------------------------------------------------------- reading the files


@functools.lru_cache(maxsize=None)
def data_text(*parts: str) -> str:
    """The text of a shipped data file, e.g. `data_text("sst2", "stsa.binary.test")`."""
    return resources.files("attnlab").joinpath("data", "classification", *parts).read_text(encoding="utf-8")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown {split=}; expected one of {SPLITS}")


def _every(rows: list, k: int, keep: Callable[[int], bool]) -> list:
    return [r for i, r in enumerate(rows) if keep(i % k)]


def read_sst2(split: str) -> list[Example]:
    """SST-2: stsa.binary.{train,dev,test}, `label sentence` per line (0 negative, 1 positive)."""
    _check_split(split)
    rows = [line.split(" ", 1) for line in data_text("sst2", f"stsa.binary.{split}").splitlines() if line.strip()]
    return [Example((text.strip(),), int(label)) for label, text in rows]


def _clean_agnews(text: str) -> str:
    # the CSV keeps HTML entities with a space before them (" #39;s", " quot;") and "\" line breaks
    for old, new in ((" #39;", "'"), ("#39;", "'"), (" quot;", '"'), ("quot;", '"'), ("#36;", "$"),
                     (" amp;", " &"), ("\\", " ")):
        text = text.replace(old, new)
    return " ".join(text.split())


def read_agnews_rows() -> list[Example]:
    """All 7,600 rows of AG News test.csv: "<title>. <description>", class index 1..4 -> 0..3."""
    reader = csv.reader(io.StringIO(data_text("agnews", "test.csv")))
    next(reader)  # header
    return [Example((_clean_agnews(f"{title}. {desc}"),), int(cls) - 1) for cls, title, desc in reader]


def read_agnews(split: str) -> list[Example]:
    """AG News ships only its test file: rows i % 10 == 0 are train, == 1 dev, the rest test."""
    _check_split(split)
    keep = {"train": lambda r: r == 0, "dev": lambda r: r == 1, "test": lambda r: r >= 2}[split]
    return _every(read_agnews_rows(), 10, keep)


TREC_CLASSES = ("NUM", "LOC", "HUM", "DESC", "ENTY", "ABBR")


def _clean_trec(text: str) -> str:
    # the questions are tokenised ("What 's", "`` ... ''"); undo the commonest splits
    for old, new in ((" 's", "'s"), ("`` ", '"'), (" ''", '"'), (" ?", "?"), (" ,", ",")):
        text = text.replace(old, new)
    return text.strip()


def read_trec_file(name: str) -> list[Example]:
    """A TREC file: `COARSE:fine question` per line; classes in `TREC_CLASSES` order."""
    rows = [line.split(" ", 1) for line in data_text("trec", name).splitlines() if line.strip()]
    return [Example((_clean_trec(q),), TREC_CLASSES.index(tag.split(":")[0])) for tag, q in rows]


def read_trec(split: str) -> list[Example]:
    """TREC: test.txt is test; train.txt rows i % 3 == 0 are dev, the others train."""
    _check_split(split)
    if split == "test":
        return read_trec_file("test.txt")
    return _every(read_trec_file("train.txt"), 3, (lambda r: r == 0) if split == "dev" else (lambda r: r != 0))


def _read_pairs(task: str, name: str, classes: Sequence[str]) -> list[Example]:
    rows = [json.loads(line) for line in data_text(task, name).splitlines() if line.strip()]
    return [Example((r["premise"].strip(), r["hypothesis"].strip()), classes.index(r["label"])) for r in rows]


CB_CLASSES = ("contradiction", "neutral", "entailment")
RTE_CLASSES = ("not_entailment", "entailment")


def read_cb(split: str) -> list[Example]:
    """CB: val.jsonl is test; train.jsonl rows i % 5 == 0 are dev, the others train."""
    _check_split(split)
    if split == "test":
        return _read_pairs("cb", "val.jsonl", CB_CLASSES)
    keep = (lambda r: r == 0) if split == "dev" else (lambda r: r != 0)
    return _every(_read_pairs("cb", "train.jsonl", CB_CLASSES), 5, keep)


def read_rte(split: str) -> list[Example]:
    """RTE: val.jsonl is test; train.jsonl rows i % 4 == 0 are dev, the others train."""
    _check_split(split)
    if split == "test":
        return _read_pairs("rte", "val.jsonl", RTE_CLASSES)
    keep = (lambda r: r == 0) if split == "dev" else (lambda r: r != 0)
    return _every(_read_pairs("rte", "train.jsonl", RTE_CLASSES), 4, keep)


def _demo_pool_apart(read: Callable[[str], list[Example]]) -> Callable[[str], list[Example]]:
    """`read`, but its train split drops rows whose text is also in dev or test (TREC repeats questions)."""

    def read_split(split: str) -> list[Example]:
        rows = read(split)
        if split == "train":
            held_out = {e.fields for s in ("dev", "test") for e in read(s)}
            rows = [r for r in rows if r.fields not in held_out]
        return rows

    read_split.__doc__ = read.__doc__
    return read_split


CLASSIFICATION_TASKS: dict[str, ClassificationTask] = {
    "sst2": ClassificationTask(
        "sst2", (("Negative",), ("Positive",)), "", "Review: ", "Sentiment:", "{0}",
        _demo_pool_apart(read_sst2), "SST-2 binary sentiment"),
    "agnews": ClassificationTask(
        "agnews", (("World",), ("Sports",), ("Business",), ("Technology", "Science")),
        "Classify the news articles into the categories of World, Sports, Business, and Technology.\n\n",
        "Article: ", "Answer:", "{0}", _demo_pool_apart(read_agnews), "AG News topic, 4 classes"),
    "trec": ClassificationTask(
        "trec", (("Number",), ("Location",), ("Person",), ("Description",), ("Entity",), ("Ab",)),
        "Classify the questions based on whether their answer type is a Number, Location, Person, "
        "Description, Entity, or Abbreviation.\n\n",
        "Question: ", "Answer Type:", "{0}", _demo_pool_apart(read_trec),
        "TREC question type, 6 coarse classes"),
    "cb": ClassificationTask(
        "cb", (("false",), ("neither",), ("true",)), "", "", "answer:",
        "{0}\nquestion: {1}. true, false, or neither?", _demo_pool_apart(read_cb),
        "CommitmentBank, 3-way entailment"),
    "rte": ClassificationTask(
        "rte", (("False",), ("True",)), "", "", "answer:",
        "{0}\nquestion: {1} True or False?", _demo_pool_apart(read_rte), "RTE, 2-way entailment"),
}


def get_classification_task(name: str) -> ClassificationTask:
    """The task called `name`; ValueError listing the known names otherwise."""
    if name not in CLASSIFICATION_TASKS:
        raise ValueError(f"unknown classification task {name=}; known: {', '.join(sorted(CLASSIFICATION_TASKS))}")
    return CLASSIFICATION_TASKS[name]


# ---------------------------------------------------------------- prompts


def sample_demonstrations(pool: Sequence[Example], shots: int, seed: int) -> list[Example]:
    """`shots` distinct rows of `pool`, drawn uniformly (not class-balanced, as in the paper), seeded."""
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise ValueError(f"`shots` must be a non-negative integer; got {shots=}")
    if shots > len(pool):
        raise ValueError(f"{shots=} exceeds the {len(pool)} rows available for demonstrations")
    return random.Random(seed).sample(list(pool), shots)


def build_prompt(task: ClassificationTask, demos: Sequence[Example], fields: Sequence[str]) -> str:
    """The few-shot prompt for an input `fields`, ending in the answer prefix (no trailing space)."""
    if len(fields) != task.n_fields:
        raise ValueError(f"task {task.name!r} takes {task.n_fields} field(s); got {len(fields)}: {fields=}")
    parts = [task.instruction]
    for d in demos:
        parts.append(f"{task.q_prefix}{task.template.format(*d.fields)}\n{task.a_prefix} {task.labels[d.label][0]}\n\n")
    parts.append(f"{task.q_prefix}{task.template.format(*fields)}\n{task.a_prefix}")
    return "".join(parts)


def content_free_prompts(task: ClassificationTask, demos: Sequence[Example],
                         inputs: Sequence[str] = CONTENT_FREE) -> list[str]:
    """One prompt per content-free input, which fills every field (premise and hypothesis alike)."""
    return [build_prompt(task, demos, (cf,) * task.n_fields) for cf in inputs]


def label_token_ids(task: ClassificationTask, tokenizer) -> list[list[list[int]]]:
    """Per class, per label word: the tokens of " <word>" (the space the answer prefix lacks)."""
    return [[tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words] for words in task.labels]


# ---------------------------------------------------------------- scoring


def continuation_log_probs(model, prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]]) -> torch.Tensor:
    """log p(continuation | prompt), summed over the continuation's tokens, for each continuation.

    One forward over the prompt (batch 1). If some continuation has more than one token, one more
    forward runs all continuations together (batch K, right-padded) on the prompt's KV cache
    repeated K times; padding follows the real tokens, so causal attention keeps it unseen.

    Returns:
        (K,) float64.
    """
    if not prompt_ids:
        raise ValueError("`prompt_ids` must not be empty")
    if not continuations or any(len(c) == 0 for c in continuations):
        raise ValueError(f"every continuation needs at least one token; got {continuations=}")
    longest = max(len(c) for c in continuations)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=model.device)  # (1, T)
    with torch.no_grad():
        out = model(ids, use_cache=longest > 1, logits_to_keep=1)  # only the last position's logits
        first = out.logits[0, -1].float().log_softmax(-1)  # (V,)
        total = torch.stack([first[c[0]] for c in continuations]).double()  # (K,)
        if longest > 1:
            k = len(continuations)
            # transformers >= 5.2x names the cache `cache`; earlier 5.x `past_key_values`
            kw = "cache" if hasattr(out, "cache") else "past_key_values"
            cache = getattr(out, kw)
            cache.batch_repeat_interleave(k)
            tail = torch.zeros(k, longest - 1, dtype=torch.long, device=model.device)  # (K, L-1)
            for i, c in enumerate(continuations):
                tail[i, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
            logp = model(tail, **{kw: cache}, use_cache=False).logits.float().log_softmax(-1)  # (K, L-1, V)
            for i, c in enumerate(continuations):
                steps = torch.arange(len(c) - 1, device=model.device)
                nxt = torch.tensor(c[1:], dtype=torch.long, device=model.device)
                total[i] += logp[i, steps, nxt].double().sum().cpu()
    return total.cpu()


def class_log_likelihoods(model, prompt_ids: Sequence[int], label_ids: Sequence[Sequence[Sequence[int]]]) -> np.ndarray:
    """Per class, log of the summed likelihood of its label words after the prompt: (C,) float64."""
    flat = [w for words in label_ids for w in words]
    lp = continuation_log_probs(model, prompt_ids, flat)
    out, at = [], 0
    for words in label_ids:
        out.append(torch.logsumexp(lp[at: at + len(words)], 0).item())
        at += len(words)
    return np.array(out)


def content_free_probs(cf_log_likelihoods: np.ndarray) -> np.ndarray:
    """p_cf: the label probabilities of the content-free inputs, averaged, then normalised.

    As in the paper, each input's raw label probabilities (not renormalised per input) are averaged.

    Args:
        cf_log_likelihoods: (K, C) class log-likelihoods of K content-free prompts.
    Returns:
        (C,) summing to 1.
    """
    p = np.exp(np.asarray(cf_log_likelihoods, dtype=np.float64)).mean(0)
    return p / p.sum()


def calibrated_predictions(log_likelihoods: np.ndarray, p_cf: np.ndarray) -> np.ndarray:
    """Contextual calibration: argmax over classes of softmax(ll) / p_cf (W = diag(p_cf)^-1, b = 0).

    Args:
        log_likelihoods: (N, C) class log-likelihoods.
        p_cf: (C,) content-free label probabilities.
    Returns:
        (N,) predicted class indices.
    """
    ll = np.asarray(log_likelihoods, dtype=np.float64)
    p = np.exp(ll - ll.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)  # (N, C)
    return np.argmax(p / np.asarray(p_cf)[None, :], axis=1)


# ---------------------------------------------------------------- intervals


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (e.g. 0/1 correctness), resampling rows."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"`values` must be a non-empty 1-D sequence; got shape {v.shape}")
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))  # (n_boot, N)
    means = v[idx].mean(1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_bootstrap_ci(before: Sequence[float], after: Sequence[float], n_boot: int = 2000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Interval of mean(after - before) on the same rows: both resampled with one set of row indices."""
    a, b = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"`before` and `after` must score the same rows; got {a.shape=} and {b.shape=}")
    return bootstrap_ci(b - a, n_boot, seed, level)
