"""Needle in a haystack: one "special magic number" for a key, at a chosen depth of a long text.

The needle and question follow RULER's niah_single ("RULER: What's the Real Context Size of Your
Long-Context Language Models?", arXiv 2404.06654), whose answers can be scored exactly, unlike
the free-text needle of the original NIAH test; `needle_grid` gives NIAH's depth x length grid.
"""
from __future__ import annotations

import random
from typing import Sequence

from .base import Sample, check_depth, check_task_args, haystack_prompt
from .haystack import random_start
from .words import random_key, random_number

NEEDLE = "One of the special magic numbers for {key} is: {value}."
INSTRUCTION = (
    "A special magic number is hidden in the text below. "
    "Read it carefully and remember it: you will be asked about it afterwards."
)
QUESTION = (
    "What is the special magic number for {key} mentioned in the text above? "
    "Answer with the number only."
)
ANSWER_PREFIX = "The special magic number for {key} mentioned in the text above is"


def make_needle(
    tokenizer,
    length: int,
    n_samples: int,
    seed: int = 0,
    *,
    depth: float | None = None,
    digits: int = 7,
    haystack: str = "kjv",
    chat: bool | None = None,
) -> list[Sample]:
    """`n_samples` single-needle prompts of at most `length` tokens each.

    Args:
        tokenizer: a Hugging Face tokenizer; lengths are counted in its tokens.
        length: prompt length in tokens (the whole prompt, template included).
        n_samples: how many samples.
        seed: the same seed and tokenizer give the same samples.
        depth: the needle's position as a fraction of the haystack; None draws one per sample.
        digits: digits of the magic number.
        haystack: "kjv" or "noise".
        chat: wrap in the chat template (None: when the tokenizer has one).

    Returns:
        Samples with `answers == (value,)`; score with `string_match_all`.
    """
    check_task_args(length, n_samples)
    if depth is not None:
        check_depth(depth)
    if not isinstance(digits, int) or digits < 1:
        raise ValueError(f"`digits` must be a positive integer; got {digits=}")
    rng = random.Random(f"needle:{seed}")
    samples = []
    for i in range(n_samples):
        key, value = random_key(rng), random_number(rng, digits)
        d = rng.random() if depth is None else depth
        start = random_start(haystack, rng)
        needle = NEEDLE.format(key=key, value=value)
        text, ids, n_words = haystack_prompt(
            tokenizer, length, source=haystack, start=start, needles=[(d, needle)],
            instruction=INSTRUCTION, question=QUESTION.format(key=key),
            answer_prefix=ANSWER_PREFIX.format(key=key), chat=chat,
        )
        meta = dict(task="needle", length=length, depth=d, seed=seed, index=i, haystack=haystack,
                    haystack_words=n_words, needle=needle, key=key)
        samples.append(Sample(text, tuple(ids), (value,), meta))
    return samples


def depth_grid(n: int) -> list[float]:
    """`n` evenly spaced depths from 0 to 1 (NIAH's linear grid)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be a positive integer; got {n=}")
    return [0.5] if n == 1 else [i / (n - 1) for i in range(n)]


def needle_grid(
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    n_samples: int,
    seed: int = 0,
    **params,
) -> list[Sample]:
    """NIAH's grid: `n_samples` needles for every (length, depth) pair; metadata records both.

    Each cell gets its own seed (derived from `seed`, the length and the depth), so cells differ.
    """
    if not lengths or not depths:
        raise ValueError(f"`lengths` and `depths` must be non-empty; got {lengths=}, {depths=}")
    out = []
    for L in lengths:
        for d in depths:
            cell_seed = hash((seed, L, round(check_depth(d), 6))) & 0x7FFFFFFF
            out.extend(make_needle(tokenizer, L, n_samples, cell_seed, depth=d, **params))
    return out
