"""Scorers: compare a model's generated text with a sample's reference answers; scores lie in [0, 1].

`string_match_all` and `string_match_part` follow RULER ("RULER: What's the Real Context Size of
Your Long-Context Language Models?"), case-insensitive, except that a reference must match as a
whole word: "1234" is not found inside "12345", nor "art" inside "start".
"""
from __future__ import annotations

import math
import re
from typing import Sequence


def _found(reference: str, prediction: str) -> bool:
    pattern = r"(?<!\w)" + re.escape(reference.strip().lower()) + r"(?!\w)"
    return re.search(pattern, prediction.lower()) is not None


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the prediction starts with one of `answers` as a whole word, else 0.0.

    Leading whitespace, quotes and '*' are ignored, and so is anything after the answer, so
    " 42137. Remember it." matches "42137" while "421370" and "The key is 42137" do not.
    """
    pred = prediction.lstrip(" \t\n\"'*`").lower()
    for ans in answers:
        a = ans.strip().lower()
        rest = pred[len(a):]
        if pred.startswith(a) and not (rest[:1].isalnum() or rest[:1] == "_"):
            return 1.0
    return 0.0


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """The fraction of `references` found in the prediction (RULER's metric for NIAH, vt, cwe)."""
    if not references:
        raise ValueError(f"`references` must not be empty; got {references=}")
    return sum(_found(r, prediction) for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any reference is found in the prediction (RULER's metric for QA)."""
    if not references:
        raise ValueError(f"`references` must not be empty; got {references=}")
    return float(any(_found(r, prediction) for r in references))


def wilson_interval(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a proportion (default 95%).

    `successes` may be fractional (a sum of partial scores); the interval then treats the mean
    score as a proportion, an approximation.
    """
    if n <= 0:
        raise ValueError(f"`n` must be positive; got {n=}")
    if not 0 <= successes <= n:
        raise ValueError(f"`successes` must lie in [0, n]; got {successes=}, {n=}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
