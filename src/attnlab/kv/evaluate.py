"""Accuracy, kept KV bytes and speed of KV policies on the long-context tasks.

One prefill serves every policy of a sample: the prompt runs once under a recording RaggedCache
(full keys/values plus the scores the policies need), its last logits give the first answer token,
and each policy compresses a copy of that recording and greedy-decodes the rest with
``model.generate``. This is exact, not an approximation: under every policy the prefill attends to the
whole prompt and compression only changes what later tokens see, which is also what
``kv.generate`` does in one go (tested token for token).

Speed: prefill tokens/s is the recording forward (prompt tokens / seconds, scores included);
decode tokens/s is new tokens / seconds of the decode steps under each policy.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..eval import get_task, model_context
from ..tasks import wilson_interval
from . import make_policy
from .base import Policy
from .cache import RaggedCache
from .session import apply


@dataclass
class PolicyResult:
    """One policy at one budget on one task: accuracy, bytes and speed, with every prediction."""

    policy: str
    budget: float
    task: str
    length: int
    n_samples: int
    accuracy: float = 0.0
    ci95: tuple[float, float] = (0.0, 1.0)
    kept_bytes: float = 0.0  # mean over samples, at the end of generation
    full_bytes: float = 0.0
    kept_fraction: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        lo, hi = self.ci95
        return (f"{self.policy:9s} budget={self.budget:<5g} {self.task} L={self.length} n={self.n_samples} "
                f"acc={self.accuracy:.3f} [{lo:.3f}, {hi:.3f}] kept={self.kept_fraction:.3f} "
                f"({self.kept_bytes / 2**20:.1f}/{self.full_bytes / 2**20:.1f} MiB) "
                f"prefill={self.prefill_tokens_per_s:.0f} tok/s decode={self.decode_tokens_per_s:.1f} tok/s")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def record_prefill(model, input_ids: torch.Tensor, score_kinds: frozenset[str], session) -> tuple[RaggedCache, torch.Tensor, float]:
    """Run the prompt once under a recording cache: (cache, last logits (B, V), seconds)."""
    cache = session.new_cache(score_kinds=score_kinds)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids, attention_mask=torch.ones_like(input_ids), cache=cache, use_cache=True,
                    logits_to_keep=1)  # (B, 1, V): the full (B, T, V) logits would be ~0.8 GB at 4K
    return cache, out.logits[:, -1].float(), time.perf_counter() - start


def decode(model, input_ids: torch.Tensor, first: torch.Tensor, cache: RaggedCache, max_new_tokens: int,
           eos: Sequence[int], pad: int) -> tuple[list[int], float]:
    """Greedy tokens after the prompt (``first`` included) under ``cache``; (tokens, decode seconds)."""
    tokens = [int(first)]
    if tokens[0] in eos or max_new_tokens <= 1:
        return tokens, 0.0
    ids = torch.cat([input_ids, first.view(1, 1)], 1)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, do_sample=False,
                             max_new_tokens=max_new_tokens - 1, pad_token_id=pad)
    seconds = time.perf_counter() - start
    return tokens + out[0, ids.shape[1]:].tolist(), seconds


def evaluate_policies(
    model,
    tokenizer,
    policies: Sequence[Policy],
    task: str,
    length: int,
    n_samples: int,
    seed: int = 0,
    *,
    max_new_tokens: int | None = None,
    progress: bool = True,
    checkpoint: str | Path | None = None,
) -> list[PolicyResult]:
    """Score every policy on the same ``n_samples`` of ``task`` at ``length`` tokens (batch 1).

    Returns one PolicyResult per policy, in order. ``checkpoint``: a JSON file rewritten after each sample.
    """
    spec = get_task(task)
    new_tokens = spec.max_new_tokens if max_new_tokens is None else max_new_tokens
    ctx = model_context(model)
    if ctx is not None and length + new_tokens > ctx:
        raise ValueError(f"{length=} plus max_new_tokens={new_tokens} exceeds the model's context of {ctx} tokens")
    if not policies:
        raise ValueError("`policies` is empty")
    samples = spec.make(tokenizer, length=length, n_samples=n_samples, seed=seed)
    kinds = frozenset(p.scores for p in policies if p.scores)
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    results = [PolicyResult(p.name, p.budget, task, length, n_samples) for p in policies]
    totals = [dict(score=0.0, kept=0, full=0, prefill_s=0.0, prefill_n=0, decode_s=0.0, decode_n=0) for _ in policies]
    for p in policies:
        p.prepare(model)
    bar = samples
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(samples, desc=f"kv {task} {length}", unit="sample")
    with apply(model, None) as session:
        for s in bar:
            ids = torch.tensor([s.input_ids], dtype=torch.long, device=model.device)
            rec, logits, prefill_s = record_prefill(model, ids, kinds, session)
            first = logits[0].argmax()
            for p, res, tot in zip(policies, results, totals):
                cache = rec.compressed(p, reserve=new_tokens + 1)
                tokens, decode_s = decode(model, ids, first, cache, new_tokens, eos, pad)
                pred = tokenizer.decode(tokens, skip_special_tokens=True)
                score = float(spec.score(pred, s.answers))
                tot["score"] += score
                tot["kept"] += cache.kept_bytes()
                tot["full"] += cache.full_bytes()
                tot["prefill_s"] += prefill_s
                tot["prefill_n"] += ids.shape[1]
                tot["decode_s"] += decode_s
                tot["decode_n"] += len(tokens) - 1  # the first token came from the prefill
                res.records.append(dict(prediction=pred, answers=list(s.answers), score=score,
                                        kept_fraction=cache.kept_fraction(), prompt_tokens=ids.shape[1],
                                        decode_s=decode_s, new_tokens=len(tokens)))
                del cache
            del rec
            _finish(results, totals, len(results[0].records))
            if checkpoint is not None:  # what is done so far survives an interrupted run
                Path(checkpoint).write_text(json.dumps([r.to_dict() for r in results], indent=1, default=str))
    return results


def _finish(results: list[PolicyResult], totals: list[dict], n: int) -> None:
    """Set each result's aggregates from the totals over the ``n`` samples done."""
    for res, tot in zip(results, totals):
        res.n_samples = n
        res.accuracy = tot["score"] / n
        res.ci95 = wilson_interval(tot["score"], n)
        res.kept_bytes, res.full_bytes = tot["kept"] / n, tot["full"] / n
        res.kept_fraction = tot["kept"] / tot["full"]
        res.prefill_tokens_per_s = tot["prefill_n"] / tot["prefill_s"]
        res.decode_tokens_per_s = tot["decode_n"] / tot["decode_s"] if tot["decode_s"] else float("nan")


def policies_for(names: Sequence[str], budgets: Sequence[float], **kwargs) -> list[Policy]:
    """Every named policy at every budget (``full`` once, at budget 1)."""
    out: list[Policy] = []
    for name in names:
        if name == "full":
            out.append(make_policy("full"))
            continue
        for b in budgets:
            out.append(make_policy(name, budget=b, **kwargs.get(name, {})))
    return out


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]
