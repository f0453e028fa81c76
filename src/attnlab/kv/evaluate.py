"""Accuracy, kept KV bytes and speed of KV policies on the long-context tasks.

One prefill serves every policy of a sample: the prompt runs once under a recording RaggedCache
(full keys/values plus the scores the policies need), its last logits give the first answer token,
and each policy compresses a copy of that recording and greedy-decodes the rest with
``model.generate``. This is exact, not an approximation: under every policy the prefill attends to the
whole prompt and compression only changes what later tokens see, which is also what
``kv.generate`` does in one go (tested token for token).

Speed: prefill tokens/s is the recording forward (prompt tokens / seconds, scores included);
decode tokens/s is new tokens / seconds of the decode steps under each policy (with a batch, every
row's steps: the batch's throughput). On CUDA the clock waits for the GPU (synchronize) at each end.
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
from .session import apply, cache_kwargs


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


def _sync(model) -> None:
    """Wait for the GPU, so that wall-clock spans measure finished work (no-op on CPU)."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def equal_length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Sample indices in batches of at most ``batch_size`` prompts that all have one length."""
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    return [idx[j:j + batch_size] for n in sorted(by_length) for idx in [by_length[n]]
            for j in range(0, len(idx), batch_size)]


def record_prefill(model, input_ids: torch.Tensor, score_kinds: frozenset[str], session,
                   attention_mask: torch.Tensor | None = None) -> tuple[RaggedCache, torch.Tensor, float]:
    """Run the prompts once under a recording cache: (cache, last logits (B, V), seconds).

    ``attention_mask`` (B, T), 0 at left padding: positions then count real tokens only, as
    ``model.generate`` numbers them, so decoding continues the same positions.
    """
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = session.new_cache(score_kinds=score_kinds)
    _sync(model)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids, attention_mask=mask, position_ids=position_ids, **cache_kwargs(model, cache),
                    use_cache=True, logits_to_keep=1)  # (B, 1, V): the full (B, T, V) logits would be ~0.8 GB at 4K
    logits = out.logits[:, -1].float()
    _sync(model)
    return cache, logits, time.perf_counter() - start


def decode(model, input_ids: torch.Tensor, first: torch.Tensor, cache: RaggedCache, max_new_tokens: int,
           eos: Sequence[int], pad: int, attention_mask: torch.Tensor | None = None
           ) -> tuple[list[list[int]], float, int]:
    """Greedy tokens after each prompt (``first`` (B,) included) under ``cache``.

    Returns (per row: its tokens up to and including its first EOS, decode seconds, decode steps).
    Every row of the batch runs every step until all rows have stopped (or ``max_new_tokens``).
    """
    first = first.view(-1)
    firsts = [int(t) for t in first.tolist()]
    if max_new_tokens <= 1 or all(t in eos for t in firsts):
        return [[t] for t in firsts], 0.0, 0
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    ids = torch.cat([input_ids, first.view(-1, 1).to(input_ids)], 1)
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    _sync(model)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), do_sample=False,
                             max_new_tokens=max_new_tokens - 1, pad_token_id=pad)
    _sync(model)
    seconds = time.perf_counter() - start
    rows = []
    for b, row in enumerate(out[:, ids.shape[1]:].tolist()):
        tokens = [firsts[b]] + row
        stop = next((i for i, t in enumerate(tokens) if t in eos), None)
        rows.append(tokens if stop is None else tokens[: stop + 1])
    return rows, seconds, out.shape[1] - ids.shape[1]


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
    batch_size: int = 1,
) -> list[PolicyResult]:
    """Score every policy on the same ``n_samples`` of ``task`` at ``length`` tokens.

    Up to ``batch_size`` prompts of the same length run together (no padding: prompts of other
    lengths go to other batches). Accuracy does not depend on it; decode tokens/s does: it counts
    every row's decode steps, so with B > 1 it is the batch's throughput. Returns one PolicyResult
    per policy, in order; records keep the samples' order (``index``).
    ``checkpoint``: a JSON file rewritten after each batch.
    """
    spec = get_task(task)
    new_tokens = spec.max_new_tokens if max_new_tokens is None else max_new_tokens
    ctx = model_context(model)
    if ctx is not None and length + new_tokens > ctx:
        raise ValueError(f"{length=} plus max_new_tokens={new_tokens} exceeds the model's context of {ctx} tokens")
    if not policies:
        raise ValueError("`policies` is empty")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int; got {batch_size=}")
    samples = spec.make(tokenizer, length=length, n_samples=n_samples, seed=seed)
    kinds = frozenset(p.scores for p in policies if p.scores)
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    results = [PolicyResult(p.name, p.budget, task, length, n_samples) for p in policies]
    totals = [dict(score=0.0, kept=0, full=0, prefill_s=0.0, prefill_n=0, decode_s=0.0, decode_n=0) for _ in policies]
    for p in policies:
        p.prepare(model)
    batches = equal_length_batches([len(x.input_ids) for x in samples], batch_size)
    bar = batches
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(batches, desc=f"kv {task} {length}", unit="batch")
    with apply(model, None) as session:
        for idx in bar:
            batch = [samples[i] for i in idx]
            ids = torch.tensor([x.input_ids for x in batch], dtype=torch.long, device=model.device)  # (B, T)
            rec, logits, prefill_s = record_prefill(model, ids, kinds, session)
            first = logits.argmax(-1)  # (B,)
            for p, res, tot in zip(policies, results, totals):
                cache = rec.compressed(p, reserve=new_tokens + 1)
                rows, decode_s, steps = decode(model, ids, first, cache, new_tokens, eos, pad)
                kept, full = cache.kept_bytes(), cache.full_bytes()
                tot["kept"] += kept
                tot["full"] += full
                tot["prefill_s"] += prefill_s
                tot["prefill_n"] += ids.numel()
                tot["decode_s"] += decode_s
                tot["decode_n"] += steps * len(batch)  # tokens computed, finished rows included
                for i, x, tokens in zip(idx, batch, rows):
                    pred = tokenizer.decode(tokens, skip_special_tokens=True)
                    score = float(spec.score(pred, x.answers))
                    tot["score"] += score
                    res.records.append(dict(index=i, prediction=pred, answers=list(x.answers), score=score,
                                            kept_fraction=kept / full, prompt_tokens=len(x.input_ids),
                                            decode_s=decode_s, new_tokens=len(tokens), batch=len(batch)))
                del cache
            del rec
            _finish(results, totals, len(results[0].records))
            if checkpoint is not None:  # what is done so far survives an interrupted run
                Path(checkpoint).write_text(json.dumps([r.to_dict() for r in results], indent=1, default=str))
    for res in results:
        res.records.sort(key=lambda r: r["index"])
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
