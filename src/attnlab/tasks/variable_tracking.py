"""Variable tracking: follow a chain of assignments `VAR B = VAR A` back to a number, and name every variable.

RULER's vt task ("RULER: What's the Real Context Size of Your Long-Context Language Models?",
arXiv 2404.06654): one chain of `n_hops` hops in the noise haystack, statements in chain order
at random depths, scored with `string_match_all` over the chain's variable names.
"""
from __future__ import annotations

import random
import string

from .base import Sample, check_task_args, haystack_prompt
from .haystack import random_start
from .words import distinct, random_number

INSTRUCTION = "Memorize and track the chain of variable assignments hidden in the following text."
QUESTION = (
    "Find all variables that are assigned the value {value} in the text above. "
    "Answer with the variable names only."
)
ANSWER_PREFIX = (
    "According to the chain of variable assignments in the text above, "
    "{n} variables are assigned the value {value}, they are:"
)


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def make_variable_tracking(
    tokenizer,
    length: int,
    n_samples: int,
    seed: int = 0,
    *,
    n_hops: int = 4,
    digits: int = 5,
    haystack: str = "noise",
    chat: bool | None = None,
) -> list[Sample]:
    """`n_samples` prompts holding one assignment chain `VAR X1 = v`, `VAR X2 = VAR X1`, ... .

    Args:
        tokenizer: a Hugging Face tokenizer; lengths are counted in its tokens.
        length: prompt length in tokens (the whole prompt, template included).
        n_samples: how many samples.
        seed: the same seed and tokenizer give the same samples.
        n_hops: assignments after the first (RULER: 4), so `n_hops + 1` variables hold the value.
        digits: digits of the value.
        haystack: "noise" (RULER's choice) or "kjv".
        chat: wrap in the chat template (None: when the tokenizer has one).

    Returns:
        Samples whose `answers` are the chain's variable names; score with `string_match_all`.
    """
    check_task_args(length, n_samples)
    if not isinstance(n_hops, int) or n_hops < 0:
        raise ValueError(f"`n_hops` must be a non-negative integer; got {n_hops=}")
    rng = random.Random(f"variable_tracking:{seed}")
    samples = []
    for i in range(n_samples):
        names = distinct(_name, n_hops + 1, rng)
        value = random_number(rng, digits)
        statements = [f"VAR {names[0]} = {value}."]
        statements += [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        # Sorted depths keep each assignment after the one it refers to.
        depths = sorted(rng.random() for _ in statements)
        start = random_start(haystack, rng)
        text, ids, n_words = haystack_prompt(
            tokenizer, length, source=haystack, start=start, needles=list(zip(depths, statements)),
            instruction=INSTRUCTION, question=QUESTION.format(value=value),
            answer_prefix=ANSWER_PREFIX.format(n=len(names), value=value), chat=chat,
        )
        meta = dict(task="variable_tracking", length=length, depths=depths, value=value, seed=seed,
                    index=i, haystack=haystack, haystack_words=n_words)
        samples.append(Sample(text, tuple(ids), tuple(names), meta))
    return samples
