"""Retrieval heads: the heads that copy a needle from a long context into the answer.

"Retrieval Head Mechanistically Explains Long-Context Factuality" (Wu et al., arXiv 2404.15574).
While the model greedily decodes the answer to a needle question, head h makes a *copy-paste event*
at a step when the token being generated, y_t, is a needle token and h's top-1 (argmax) attention
from the query that generates y_t falls inside the needle span on a position holding that same
token. Per sample,

    score(h) = (number of copy-paste events of h) / |needle|,

each event counting once per step, as in the paper's code. A sample counts only if the model
recalls the needle (ROUGE-1 recall over needle tokens > 0.5, the paper's filter); the head's
retrieval score is the mean over counted samples, and a head with score > 0.1 is a retrieval head.

Here the needle span is the answer's tokens inside the needle sentence (the 7-digit value of
:func:`attnlab.tasks.make_needle`): the prompt ends with an answer prefix, so the model's answer
is the value alone. Streaming: :class:`RetrievalObserver` keeps only the argmax key of each head for
the last query row of each call, O(steps x L x H); no (N, N) map is kept. The prompt (but its last
token) is prefilled with plain SDPA and then every generated token comes from a one-query call.
"""
from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..hf.attach import attach
from ..probes.base import CallContext, Observer
from ..tasks import Sample, string_match_all

THRESHOLD = 0.1  # the paper's cut between retrieval heads and the rest


class RetrievalObserver(Observer):
    """Records, per call and layer, each head's argmax key for the call's last query row.

    The last row of a call is the query whose output predicts the next token, so with one call per
    generated token, call t of each layer holds the attention that generated token t.
    ``top1()`` is (B, S, L, H) long for S calls. Ties go to the lower key index.
    """

    narrow_ok = True  # argmax over the first W keys is exact: later keys hold probability 0

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._top1: dict[int, list[torch.Tensor]] = {}
        self.n_layers: int | None = None

    def observe(self, ctx: CallContext, q_start: int, probs: torch.Tensor) -> None:
        if q_start + probs.shape[2] != ctx.n_q:
            return  # not the chunk holding the call's last query row
        self.n_layers = ctx.n_layers
        self._top1.setdefault(ctx.layer, []).append(probs[:, :, -1].argmax(-1).cpu())  # (B, H)

    def top1(self) -> torch.Tensor:
        """(B, S, L, H) long: argmax key of head (l, h) at call s."""
        if not self._top1:
            raise RuntimeError("RetrievalObserver saw no attention call")
        steps = {len(v) for v in self._top1.values()}
        layers = sorted(self._top1)
        if len(steps) != 1 or layers != list(range(self.n_layers or 0)):
            raise RuntimeError(f"uneven calls per layer: {steps=}, {layers=}")
        return torch.stack([torch.stack(self._top1[l], 1) for l in layers], 2)


def copy_paste_events(
    top1: torch.Tensor, generated: torch.Tensor, context_ids: torch.Tensor, span: tuple[int, int]
) -> torch.Tensor:
    """(S, L, H) bool: head (l, h) copy-pastes generated token s from the needle span.

    Args:
        top1: (S, L, H) long, the argmax key of each head at the step that generated token s.
        generated: (S,) long, the generated tokens.
        context_ids: (N,) long, the prompt's tokens (key j holds ``context_ids[j]`` for j < N).
        span: [start, end) positions of the needle inside the prompt.
    """
    start, end = span
    if not 0 <= start < end <= len(context_ids):
        raise ValueError(f"`span` must satisfy 0 <= start < end <= {len(context_ids)}; got {span=}")
    if top1.shape[0] != generated.shape[0]:
        raise ValueError(f"one top-1 row per generated token: {top1.shape=}, {generated.shape=}")
    inside = (top1 >= start) & (top1 < end)
    token_there = context_ids[top1.clamp(0, len(context_ids) - 1)]
    return inside & (token_there == generated.view(-1, 1, 1))


def copy_paste_score(top1, generated, context_ids, span) -> torch.Tensor:
    """(L, H) float64: copy-paste events of each head over |needle| (see :func:`copy_paste_events`)."""
    events = copy_paste_events(top1, generated, context_ids, span)
    return events.sum(0).double() / (span[1] - span[0])


def needle_recall(generated: Sequence[int], needle: Sequence[int]) -> float:
    """ROUGE-1 recall over token ids: the share of the needle's tokens (a multiset) that were generated."""
    if not needle:
        raise ValueError("`needle` must hold at least one token")
    overlap = Counter(generated) & Counter(needle)
    return sum(overlap.values()) / len(needle)


def answer_span(tokenizer, sample: Sample) -> tuple[int, int]:
    """[start, end) token positions of ``sample.answers[0]`` inside the needle sentence of the prompt.

    The needle sentence is ``sample.metadata["needle"]`` when present (else the first occurrence of
    the answer in the prompt is used). Needs a fast tokenizer (character offsets).
    """
    answer = sample.answers[0]
    needle = sample.metadata.get("needle", answer)
    at = sample.prompt.find(needle)
    if at < 0 or answer not in needle:
        raise ValueError(f"answer {answer!r} (needle {needle!r}) not found in the sample's prompt")
    lo = at + needle.rfind(answer)
    hi = lo + len(answer)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; answer spans need its offsets")
    enc = tokenizer(sample.prompt, add_special_tokens=False, return_offsets_mapping=True)
    if tuple(enc["input_ids"]) != tuple(sample.input_ids):
        raise ValueError("re-tokenising the prompt does not give sample.input_ids; cannot place the needle")
    hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < hi and b > lo and b > a]
    return hits[0], hits[-1] + 1


def greedy_top1_trace(
    model, input_ids: Sequence[int], max_new_tokens: int, *, stop_ids: Sequence[int] = (),
    tokenizer=None, chunk: int = 256,
) -> tuple[list[int], torch.Tensor]:
    """Greedy-decode after ``input_ids`` (batch 1), recording every head's argmax key per generated token.

    The prompt but its last token is prefilled with plain SDPA; the rest runs one query per call
    under a :class:`RetrievalObserver`. Decoding stops after a token in ``stop_ids`` or, with a
    ``tokenizer``, after a token containing a newline (the paper's stop rule).

    Returns:
        (generated token ids, top1 (S, L, H) long), with S = len(generated).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be a positive int; got {max_new_tokens=}")
    if len(input_ids) < 1:
        raise ValueError("`input_ids` must hold at least one token")
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=model.device)  # (1, N)
    obs, generated, cache = RetrievalObserver(), [], None
    params = inspect.signature(model.forward).parameters
    # transformers >= 5.2x names the cache argument ``cache``; older models ``past_key_values``
    cache_arg = "cache" if "cache" in params else "past_key_values"
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # prefill: only the cache is needed
    with torch.no_grad():
        if ids.shape[1] > 1:
            cache = model(input_ids=ids[:, :-1], use_cache=True, **keep).past_key_values
        nxt = ids[:, -1:]
        with attach(model, obs, chunk=chunk):
            for _ in range(max_new_tokens):
                out = model(input_ids=nxt, use_cache=True, **{cache_arg: cache})
                cache = out.past_key_values
                tok = int(out.logits[0, -1].argmax())
                generated.append(tok)
                if tok in stop_ids or (tokenizer is not None and "\n" in tokenizer.decode([tok])):
                    break
                nxt = torch.tensor([[tok]], dtype=torch.long, device=model.device)
    return generated, obs.top1()[0]


def stop_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids of the tokenizer and of the model's generation config."""
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(config_eos) if isinstance(config_eos, (list, tuple)) else [config_eos]
    return {int(i) for i in ids + [tokenizer.eos_token_id] if i is not None}


@dataclass
class RetrievalScores:
    """Retrieval scores of every head, with what produced them.

    Attributes:
        scores: (L, H) float64, mean copy-paste score over the counted samples (zeros if none counted).
        records: one dict per sample: params, prediction, needle recall, correct, counted.
        n_counted: samples whose needle recall passed ``min_recall``.
        min_recall: the recall filter used.
    """

    scores: torch.Tensor
    records: list[dict] = field(default_factory=list)
    n_counted: int = 0
    min_recall: float = 0.5

    def heads(self, threshold: float = THRESHOLD) -> list[tuple[int, int]]:
        """(layer, head) pairs with score > ``threshold``, highest score first."""
        order = torch.argsort(self.scores.flatten(), descending=True, stable=True)
        n_heads = self.scores.shape[1]
        return [(int(i) // n_heads, int(i) % n_heads) for i in order if self.scores.flatten()[i] > threshold]

    def ranking(self) -> list[tuple[int, int]]:
        """Every (layer, head), highest score first (ties by index)."""
        return self.heads(threshold=float("-inf"))

    def fraction_above(self, threshold: float = THRESHOLD) -> float:
        return float((self.scores > threshold).double().mean())

    def to_dict(self, threshold: float = THRESHOLD) -> dict:
        return {
            "definition": "copy-paste events / |needle| per head, mean over samples with needle recall "
                          f"> {self.min_recall} (Wu et al., arXiv 2404.15574)",
            "n_layers": self.scores.shape[0], "n_heads": self.scores.shape[1],
            "threshold": threshold, "fraction_above_threshold": self.fraction_above(threshold),
            "retrieval_heads": [list(p) for p in self.heads(threshold)],
            "n_samples": len(self.records), "n_counted": self.n_counted, "min_recall": self.min_recall,
            "scores": self.scores.tolist(), "samples": self.records,
        }


def retrieval_head_scores(
    model, tokenizer, samples: Sequence[Sample], *, max_new_tokens: int | None = None,
    min_recall: float = 0.5, chunk: int = 256, progress: bool = True,
) -> RetrievalScores:
    """Retrieval score of every head over needle ``samples`` (batch 1, greedy decoding).

    Args:
        model, tokenizer: a causal LM that :func:`attnlab.attach` accepts, and its fast tokenizer.
        samples: needle samples (e.g. :func:`attnlab.tasks.needle_grid`); ``answers[0]`` is the needle.
        max_new_tokens: decoding budget; None: the needle's token count + 8.
        min_recall: a sample counts when its needle recall is > this (paper: 0.5).
        chunk: query rows per chunk on the exact path.
        progress: tqdm progress bar.
    """
    if not samples:
        raise ValueError(f"`samples` must hold at least one needle sample; got {len(samples)=}")
    if not isinstance(min_recall, (int, float)) or not 0.0 <= min_recall < 1.0:
        raise ValueError(f"`min_recall` must lie in [0, 1); got {min_recall=}")
    stop = stop_ids(model, tokenizer)
    spans = [answer_span(tokenizer, s) for s in samples]  # fail on a bad sample before any model run
    total, records, counted = None, [], 0
    bar = samples
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(samples, desc="retrieval heads", unit="sample")
    for s, span in zip(bar, spans):
        context = torch.tensor(s.input_ids, dtype=torch.long)
        budget = max_new_tokens or (span[1] - span[0] + 8)
        gen, top1 = greedy_top1_trace(model, s.input_ids, budget, stop_ids=stop, tokenizer=tokenizer, chunk=chunk)
        score = copy_paste_score(top1, torch.tensor(gen), context, span)
        total = torch.zeros_like(score) if total is None else total
        recall = needle_recall(gen, s.input_ids[span[0]:span[1]])
        ok = recall > min_recall
        if ok:
            total += score
            counted += 1
        pred = tokenizer.decode(gen, skip_special_tokens=True)
        records.append(dict(
            length=s.metadata.get("length"), depth=s.metadata.get("depth"), seed=s.metadata.get("seed"),
            prompt_tokens=len(s.input_ids), needle_span=list(span), answer=s.answers[0], prediction=pred,
            correct=string_match_all(pred, s.answers), needle_recall=recall, counted=ok,
            max_score=float(score.max()),
        ))
        if progress:
            bar.set_postfix(counted=counted)
    return RetrievalScores(total / max(counted, 1), records, counted, float(min_recall))
