"""English word lists for keys and list tasks, from the PyPI package `wonderwords` (shipped in its wheel).

RULER builds its needle keys ("adjective-noun") and word lists from the same files.
"""
from __future__ import annotations

import functools
import importlib.resources
import random

KINDS = ("noun", "adjective", "verb")


@functools.lru_cache(maxsize=None)
def word_list(kind: str) -> tuple[str, ...]:
    """Sorted, de-duplicated lowercase single words (letters only) of one kind: noun, adjective or verb."""
    if kind not in KINDS:
        raise ValueError(f"unknown word kind; expected one of {KINDS}, got {kind=}")
    try:
        assets = importlib.resources.files("wonderwords.assets")
    except ModuleNotFoundError as err:
        raise ImportError("word lists need the PyPI package `wonderwords` (pip install wonderwords)") from err
    text = assets.joinpath(f"{kind}list.txt").read_text(encoding="utf-8")
    # Acronyms, phrases and hyphenated entries would blur keys and counts; keep plain words.
    words = (w.strip() for w in text.splitlines())
    return tuple(sorted({w for w in words if w.isalpha() and w.islower()}))


@functools.lru_cache(maxsize=1)
def english_words() -> tuple[str, ...]:
    """Nouns, adjectives and verbs together, de-duplicated and sorted (about 8,600 words)."""
    return tuple(sorted(set(word_list("noun")) | set(word_list("adjective")) | set(word_list("verb"))))


def random_key(rng: random.Random) -> str:
    """A needle key such as "quizzical-lantern" (adjective-noun)."""
    return f"{rng.choice(word_list('adjective'))}-{rng.choice(word_list('noun'))}"


def distinct(draw, n: int, rng: random.Random) -> list:
    """`n` distinct values from `draw(rng)` (a generator function), in the order drawn."""
    seen: list = []
    while len(seen) < n:
        v = draw(rng)
        if v not in seen:
            seen.append(v)
    return seen


def random_number(rng: random.Random, digits: int = 7) -> str:
    """A random number with exactly `digits` digits (no leading zero), as text."""
    return str(rng.randrange(10 ** (digits - 1), 10**digits))
