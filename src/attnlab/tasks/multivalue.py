"""Multi-value needles: one key has several numbers, spread through the haystack; all must be recalled.

RULER's niah_multivalue ("RULER: What's the Real Context Size of Your Long-Context Language
Models?", arXiv 2404.06654), scored with `string_match_all` (partial credit per value).
"""
from __future__ import annotations

import random

from .base import Sample, check_task_args, haystack_prompt
from .haystack import random_start
from .needle import NEEDLE
from .words import distinct, random_key, random_number

INSTRUCTION = (
    "Several special magic numbers are hidden in the text below. "
    "Read it carefully and remember them: you will be asked about them afterwards."
)
QUESTION = (
    "What are all the special magic numbers for {key} mentioned in the text above? "
    "Answer with the numbers only."
)
ANSWER_PREFIX = "The special magic numbers for {key} mentioned in the text above are"


def make_multivalue(
    tokenizer,
    length: int,
    n_samples: int,
    seed: int = 0,
    *,
    n_values: int = 4,
    digits: int = 7,
    haystack: str = "kjv",
    chat: bool | None = None,
) -> list[Sample]:
    """`n_samples` prompts with `n_values` needles for one key at random depths.

    Args:
        tokenizer: a Hugging Face tokenizer; lengths are counted in its tokens.
        length: prompt length in tokens (the whole prompt, template included).
        n_samples: how many samples.
        seed: the same seed and tokenizer give the same samples.
        n_values: numbers for the key (RULER: 4).
        digits: digits of each number.
        haystack: "kjv" or "noise".
        chat: wrap in the chat template (None: when the tokenizer has one).

    Returns:
        Samples whose `answers` are all the values; score with `string_match_all`.
    """
    check_task_args(length, n_samples)
    if not isinstance(n_values, int) or n_values < 1:
        raise ValueError(f"`n_values` must be a positive integer; got {n_values=}")
    rng = random.Random(f"multivalue:{seed}")
    samples = []
    for i in range(n_samples):
        key = random_key(rng)
        values = distinct(lambda r: random_number(r, digits), n_values, rng)
        depths = [rng.random() for _ in range(n_values)]
        start = random_start(haystack, rng)
        needles = [(d, NEEDLE.format(key=key, value=v)) for d, v in zip(depths, values)]
        text, ids, n_words = haystack_prompt(
            tokenizer, length, source=haystack, start=start, needles=needles,
            instruction=INSTRUCTION, question=QUESTION.format(key=key),
            answer_prefix=ANSWER_PREFIX.format(key=key), chat=chat,
        )
        meta = dict(task="multivalue", length=length, depths=depths, key=key, seed=seed, index=i,
                    haystack=haystack, haystack_words=n_words)
        samples.append(Sample(text, tuple(ids), tuple(values), meta))
    return samples
