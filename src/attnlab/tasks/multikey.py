"""Multi-key needles: several key -> number needles in one haystack; the question asks for one key's number.

RULER's niah_multikey_1 ("RULER: What's the Real Context Size of Your Long-Context Language
Models?", arXiv 2404.06654): the other needles are distractors that differ only in their key.
"""
from __future__ import annotations

import random

from .base import Sample, check_task_args, haystack_prompt
from .haystack import random_start
from .needle import ANSWER_PREFIX, NEEDLE, QUESTION
from .words import distinct, random_key, random_number

INSTRUCTION = (
    "Several special magic numbers are hidden in the text below. "
    "Read it carefully and remember them: you will be asked about one of them afterwards."
)


def make_multikey(
    tokenizer,
    length: int,
    n_samples: int,
    seed: int = 0,
    *,
    n_keys: int = 4,
    digits: int = 7,
    haystack: str = "kjv",
    chat: bool | None = None,
) -> list[Sample]:
    """`n_samples` prompts with `n_keys` needles at random depths, one of them queried.

    Args:
        tokenizer: a Hugging Face tokenizer; lengths are counted in its tokens.
        length: prompt length in tokens (the whole prompt, template included).
        n_samples: how many samples.
        seed: the same seed and tokenizer give the same samples.
        n_keys: needles per prompt (RULER: 4), each with its own key and number.
        digits: digits of each number.
        haystack: "kjv" or "noise".
        chat: wrap in the chat template (None: when the tokenizer has one).

    Returns:
        Samples with `answers == (queried value,)`; metadata has all depths and which was asked.
        Score with `string_match_all`.
    """
    check_task_args(length, n_samples)
    if not isinstance(n_keys, int) or n_keys < 1:
        raise ValueError(f"`n_keys` must be a positive integer; got {n_keys=}")
    rng = random.Random(f"multikey:{seed}")
    samples = []
    for i in range(n_samples):
        keys = distinct(random_key, n_keys, rng)
        values = distinct(lambda r: random_number(r, digits), n_keys, rng)
        depths = [rng.random() for _ in range(n_keys)]
        asked = rng.randrange(n_keys)
        start = random_start(haystack, rng)
        needles = [(d, NEEDLE.format(key=k, value=v)) for d, k, v in zip(depths, keys, values)]
        text, ids, n_words = haystack_prompt(
            tokenizer, length, source=haystack, start=start, needles=needles,
            instruction=INSTRUCTION, question=QUESTION.format(key=keys[asked]),
            answer_prefix=ANSWER_PREFIX.format(key=keys[asked]), chat=chat,
        )
        meta = dict(task="multikey", length=length, depth=depths[asked], depths=depths, asked=asked,
                    keys=keys, values=values, seed=seed, index=i, haystack=haystack, haystack_words=n_words)
        samples.append(Sample(text, tuple(ids), (values[asked],), meta))
    return samples
