"""Common words extraction: in a long numbered list of words, name the few that repeat most.

RULER's cwe task ("RULER: What's the Real Context Size of Your Long-Context Language Models?",
arXiv 2404.06654): `n_common` words appear `freq_common` times each, as many rare words as fit
appear `freq_rare` times each; scored with `string_match_all` over the common words.
"""
from __future__ import annotations

import random

from .base import Sample, build_prompt, check_task_args, fit_length
from .words import english_words

INSTRUCTION = "Below is a numbered list of words. Some of them appear many times."
QUESTION = "What are the {n} most common words in the list above? Answer with the words only."
ANSWER_PREFIX = "The {n} most common words in the list above are:"


def default_frequencies(length: int) -> tuple[int, int]:
    """(freq_common, freq_rare) for a length: RULER's 30 and 3 from 4.5K tokens on, fewer below so the
    common words still fit (each list item costs about 4 tokens)."""
    freq_common = max(3, min(30, length // 150))
    return freq_common, max(1, freq_common // 10)


def make_common_words(
    tokenizer,
    length: int,
    n_samples: int,
    seed: int = 0,
    *,
    n_common: int = 10,
    freq_common: int | None = None,
    freq_rare: int | None = None,
    chat: bool | None = None,
) -> list[Sample]:
    """`n_samples` word-list prompts of at most `length` tokens each.

    Args:
        tokenizer: a Hugging Face tokenizer; lengths are counted in its tokens.
        length: prompt length in tokens (the whole prompt, template included).
        n_samples: how many samples.
        seed: the same seed and tokenizer give the same samples.
        n_common: how many common words to find (RULER: 10).
        freq_common, freq_rare: occurrences of each common / rare word; None picks
            `default_frequencies(length)`. `freq_rare` must be smaller than `freq_common`.
        chat: wrap in the chat template (None: when the tokenizer has one).

    Returns:
        Samples whose `answers` are the common words; score with `string_match_all`.
    """
    check_task_args(length, n_samples)
    auto_common, auto_rare = default_frequencies(length)
    freq_common = auto_common if freq_common is None else freq_common
    freq_rare = auto_rare if freq_rare is None else freq_rare
    if not isinstance(n_common, int) or n_common < 1:
        raise ValueError(f"`n_common` must be a positive integer; got {n_common=}")
    if not isinstance(freq_rare, int) or freq_rare < 1:
        raise ValueError(f"`freq_rare` must be a positive integer; got {freq_rare=}")
    if not isinstance(freq_common, int) or freq_common <= freq_rare:
        raise ValueError(f"`freq_common` must be an integer above {freq_rare=}; got {freq_common=}")
    vocab = english_words()
    rng = random.Random(f"common_words:{seed}")
    q, a = QUESTION.format(n=n_common), ANSWER_PREFIX.format(n=n_common)
    samples = []
    for i in range(n_samples):
        words = rng.sample(vocab, len(vocab))
        common, rare = words[:n_common], words[n_common:]
        order_seed = rng.getrandbits(64)

        def build(n_rare: int) -> tuple[str, list[int]]:
            items = common * freq_common + rare[:n_rare] * freq_rare
            random.Random(order_seed).shuffle(items)
            context = " ".join(f"{j + 1}. {w}" for j, w in enumerate(items))
            return build_prompt(tokenizer, INSTRUCTION, context, q, a, chat)

        n_rare, text, ids = fit_length(build, length, max_units=len(rare),
                                       what=f"rare words ({n_common} common words x {freq_common})")
        meta = dict(task="common_words", length=length, n_rare=n_rare, freq_common=freq_common,
                    freq_rare=freq_rare, seed=seed, index=i)
        samples.append(Sample(text, tuple(ids), tuple(common), meta))
    return samples
