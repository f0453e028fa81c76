"""Echo and induction head scores as RazorAttention computes them: data-free, on repeated random tokens.

"RazorAttention: Efficient KV Cache Compression Through Retrieval Heads" (Tang et al., ICLR 2025,
arXiv 2407.15891). For RoPE models the heads that must keep their full KV cache are
*echo heads*, which attend to the earlier copy of the current token, and *induction heads*, which
attend to the token that followed that copy. Both are found without data: feed BOS followed by a
block of ``period`` random token ids repeated ``n_repeats`` times, and score each head by its mean
attention, over the queries of the second and later copies, on

    echo:       key i - period       (the same token one copy earlier)
    induction:  key i - period + 1   (the token after it)

RazorAttention then protects the top 14% induction heads and the top 1% echo heads
(:func:`razor_retrieval_heads`). For GQA models a KV head is protected when any query head of its
group is: the ``*_kv`` scores are the maximum over each group, as in the reference implementation.

The scores come from :class:`attnlab.analysis.induction.InductionObserver` (streaming, no
(N, N) map kept), so any model that :func:`attnlab.attach` accepts works.
"""
from __future__ import annotations

import torch

from ..hf.attach import attach
from .induction import InductionObserver, repeated_random_tokens


def razor_head_scores(
    model,
    *,
    period: int = 512,
    n_repeats: int = 4,
    seed: int = 0,
    tokenizer=None,
    chunk: int = 256,
) -> dict[str, torch.Tensor]:
    """Echo and induction scores of every head from one repeated random-token sequence.

    Args:
        model: a causal transformers model that :func:`attnlab.attach` accepts (e.g. SmolLM2).
        period: length of the random block (RazorAttention uses 2,500; 512 keeps a CPU run short).
        n_repeats: copies of the block (>= 2); the sequence has ``1 + period * n_repeats`` tokens.
        seed: seed of the random ids; the same seed gives the same sequence and scores.
        tokenizer: when given, its special ids are never drawn and its BOS starts the sequence;
            otherwise ``model.config.bos_token_id`` is used and every id may be drawn.
        chunk: query rows per chunk on attnlab's exact attention path (memory O(chunk x N)).

    Returns:
        ``{"echo": (L, H), "induction": (L, H), "echo_kv": (L, H_kv), "induction_kv": (L, H_kv)}``,
        float64 CPU tensors; a head's score is its mean attention probability on the echo
        (induction) key, in [0, 1]. ``*_kv`` is the maximum over the query heads of each KV group.

    Raises:
        ValueError: ``period`` < 2, ``n_repeats`` < 2, or a sequence longer than the model's context.
    """
    ids = razor_probe_ids(model, period=period, n_repeats=n_repeats, seed=seed, tokenizer=tokenizer)
    prefix = ids.shape[1] - period * n_repeats  # 1 with a BOS, else 0
    obs = InductionObserver(period, prefix=prefix)
    with torch.no_grad(), attach(model, obs, chunk=chunk):
        model(input_ids=ids.to(model.device), use_cache=False)
    per_head = obs.result()["per_head"]
    echo = _as_tensor(per_head["echo"], "echo")
    induction = _as_tensor(per_head["induction"], "induction")
    groups = _kv_groups(model, echo.shape[1])
    return {
        "echo": echo,
        "induction": induction,
        "echo_kv": group_max(echo, groups),
        "induction_kv": group_max(induction, groups),
    }


def razor_probe_ids(model, *, period: int, n_repeats: int, seed: int = 0, tokenizer=None) -> torch.Tensor:
    """(1, [1 +] period * n_repeats) long: the probe sequence :func:`razor_head_scores` feeds."""
    if not isinstance(period, int) or isinstance(period, bool) or period < 2:
        raise ValueError(f"`period` must be an int >= 2; got {period=}")
    if not isinstance(n_repeats, int) or isinstance(n_repeats, bool) or n_repeats < 2:
        raise ValueError(f"`n_repeats` must be an int >= 2; got {n_repeats=}")
    config = model.config
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else getattr(config, "bos_token_id", None)
    n_tokens = period * n_repeats + (bos is not None)
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and n_tokens > context:
        raise ValueError(f"{period=} x {n_repeats=} (+ BOS) = {n_tokens} tokens exceeds the model's context {context}")
    exclude = list(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else []
    return repeated_random_tokens(period, vocab_size=config.vocab_size, n_repeats=n_repeats,
                                  bos_token_id=bos, exclude_ids=exclude, seed=seed)


def razor_retrieval_heads(
    scores: dict[str, torch.Tensor],
    *,
    induction_frac: float = 0.14,
    echo_frac: float = 0.01,
    kv: bool = False,
) -> torch.Tensor:
    """(L, H) bool (or (L, H_kv) with ``kv=True``): RazorAttention's protected heads.

    The union of the top ``induction_frac`` heads by induction score and the top ``echo_frac`` by
    echo score, counted over all L x H heads (at least one head each when the fraction is > 0).

    Args:
        scores: the output of :func:`razor_head_scores`.
        induction_frac, echo_frac: fractions in [0, 1] (paper defaults 14% and 1%).
        kv: select among KV heads using the ``*_kv`` scores.
    """
    for name, frac in (("induction_frac", induction_frac), ("echo_frac", echo_frac)):
        if not isinstance(frac, (int, float)) or not 0.0 <= frac <= 1.0:
            raise ValueError(f"`{name}` must be a fraction in [0, 1]; got {name}={frac!r}")
    suffix = "_kv" if kv else ""
    keys = [f"induction{suffix}", f"echo{suffix}"]
    missing = [k for k in keys if k not in scores]
    if missing:
        raise ValueError(f"`scores` lacks {missing}; pass the dict razor_head_scores returns")
    return top_fraction(scores[keys[0]], induction_frac) | top_fraction(scores[keys[1]], echo_frac)


def top_fraction(score: torch.Tensor, frac: float) -> torch.Tensor:
    """Bool mask of ``score``'s shape: its ``ceil(frac * numel)`` largest entries (ties by index)."""
    k = int(torch.tensor(frac * score.numel()).ceil().item()) if frac > 0 else 0
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    if k:
        mask[torch.topk(score.flatten().double(), k, sorted=False).indices] = True
    return mask.view(score.shape)


def group_max(per_head: torch.Tensor, groups: int) -> torch.Tensor:
    """(L, H) -> (L, H / groups): the maximum over each run of ``groups`` consecutive query heads.

    transformers' GQA repeats KV head k for query heads ``k * groups ... (k + 1) * groups - 1``.
    """
    layers, heads = per_head.shape
    if groups < 1 or heads % groups:
        raise ValueError(f"{heads=} query heads do not split into KV groups of {groups=}")
    return per_head.view(layers, heads // groups, groups).amax(-1)


def _kv_groups(model, n_heads: int) -> int:
    n_kv = getattr(model.config, "num_key_value_heads", None) or n_heads
    return n_heads // n_kv


def _as_tensor(rows: list, name: str) -> torch.Tensor:
    if any(r is None for r in rows):
        missing = [i for i, r in enumerate(rows) if r is None]
        raise RuntimeError(f"no {name} score for layers {missing}: those layers never ran")
    return torch.tensor(rows, dtype=torch.float64)
