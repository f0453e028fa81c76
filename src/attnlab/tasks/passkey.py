"""Passkey retrieval: find a 1-5 digit number hidden in a long filler text.

The template of "Landmark Attention: Random-Access Infinite Context Length for Transformers"
(arXiv 2305.16300), with the KJV as filler by default instead of the repeated grass/sky lines,
and the question asking for the number only.
"""
from __future__ import annotations

import random

from .base import Sample, check_depth, check_task_args, haystack_prompt
from .haystack import random_start

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize them. I will quiz you about the important information there."
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
# Instruct models answer "What is the pass key?" with a definition of pass keys unless told the
# form of the answer (SmolLM2-135M-Instruct: 0/6 -> 6/6 at 1K tokens), so the question says it.
QUESTION = "What is the pass key? Answer with the number only."
ANSWER_PREFIX = "The pass key is"


def make_passkey(
    tokenizer,
    length: int,
    n_samples: int,
    seed: int = 0,
    *,
    depth: float | None = None,
    haystack: str = "kjv",
    chat: bool | None = None,
) -> list[Sample]:
    """`n_samples` passkey prompts of at most `length` tokens each.

    Args:
        tokenizer: a Hugging Face tokenizer; lengths are counted in its tokens.
        length: prompt length in tokens (the whole prompt, template included).
        n_samples: how many samples.
        seed: the same seed and tokenizer give the same samples.
        depth: where the needle goes, as a fraction of the haystack (0 = start, 1 = end);
            None draws a depth per sample uniformly.
        haystack: "kjv" or "noise" (the original grass/sky filler).
        chat: wrap in the chat template (None: when the tokenizer has one).

    Returns:
        Samples with `answers == (key,)`; score with `exact_match`.
    """
    check_task_args(length, n_samples)
    if depth is not None:
        check_depth(depth)
    rng = random.Random(f"passkey:{seed}")
    samples = []
    for i in range(n_samples):
        key = str(rng.randint(1, 50000))
        d = rng.random() if depth is None else depth
        start = random_start(haystack, rng)
        text, ids, n_words = haystack_prompt(
            tokenizer, length, source=haystack, start=start, needles=[(d, NEEDLE.format(key=key))],
            instruction=INSTRUCTION, question=QUESTION, answer_prefix=ANSWER_PREFIX, chat=chat,
        )
        meta = dict(task="passkey", length=length, depth=d, seed=seed, index=i, haystack=haystack,
                    haystack_words=n_words, needle=NEEDLE.format(key=key))
        samples.append(Sample(text, tuple(ids), (key,), meta))
    return samples
