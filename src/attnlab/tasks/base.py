"""What long-context tasks share: the `Sample`, chat-aware prompts, fitting a prompt to a token length.

A task fills a haystack to exactly-ish `length` tokens of the given tokenizer (the whole prompt,
chat template and question included, never more than `length`), places its needles at sentence
boundaries at the requested depths, and asks its question at the end.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .haystack import haystack_words, split_sentences

_SENTENCE_DONE = re.compile(r"[.!?]['\")\]]?$")


@dataclass(frozen=True)
class Sample:
    """One task instance.

    Attributes:
        prompt: the full text given to the model (chat template applied when used).
        input_ids: its tokens, `len(input_ids) <= length`; feed these, not a re-tokenised prompt.
        answers: the reference answers; a scorer compares a prediction with all of them.
        metadata: task name, length, depth(s), seed and anything else a report may group by.
    """

    prompt: str
    input_ids: tuple[int, ...]
    answers: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)


def check_task_args(length: int, n_samples: int) -> None:
    """Raise ValueError for a non-positive `length` or `n_samples`."""
    if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
        raise ValueError(f"`length` must be a positive number of tokens; got {length=}")
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples <= 0:
        raise ValueError(f"`n_samples` must be a positive integer; got {n_samples=}")


def check_depth(depth: float, name: str = "depth") -> float:
    """A depth is a fraction of the haystack in [0, 1]: 0 puts the needle first, 1 last."""
    if not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"`{name}` must be a fraction in [0, 1]; got {name}={depth!r}")
    return float(depth)


def uses_chat(tokenizer, chat: bool | None) -> bool:
    """Whether to wrap the prompt in the tokenizer's chat template (None: whenever it has one)."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat is None:
        return has_template
    if chat and not has_template:
        raise ValueError(f"{chat=} but the tokenizer has no chat template")
    return bool(chat)


def build_prompt(
    tokenizer,
    instruction: str,
    context: str,
    question: str,
    answer_prefix: str,
    chat: bool | None = None,
) -> tuple[str, list[int]]:
    """The prompt text and its token ids: instruction, context, then the question at the end.

    With a chat template the three go into one user turn and `answer_prefix` starts the
    assistant turn, so the model's first new tokens are the answer. Without one, the text is
    plain and the tokenizer adds its own special tokens (BOS).
    """
    body = "\n\n".join(part for part in (instruction, context, question) if part)
    if uses_chat(tokenizer, chat):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
        )
        text += answer_prefix
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        text = f"{body} {answer_prefix}" if answer_prefix else body
        ids = tokenizer(text)["input_ids"]
    return text, list(ids)


def insert_at_depths(sentences: Sequence[str], needles: Sequence[tuple[float, str]]) -> str:
    """Join `sentences` with each needle placed at the sentence boundary nearest its depth.

    The depth of a boundary is the fraction of haystack characters before it. A boundary must
    follow a finished sentence ('.', '!' or '?'), so a haystack cut mid-sentence keeps its
    unfinished tail after the last needle. Needles that land on one boundary keep the order they
    were given in (variable tracking relies on this).

    Args:
        sentences: the haystack, already split into sentences.
        needles: (depth in [0, 1], needle sentence) pairs.
    """
    cum = [0]
    for s in sentences:
        cum.append(cum[-1] + len(s) + 1)
    total = max(cum[-1], 1)
    boundaries = [0] + [i + 1 for i, s in enumerate(sentences) if _SENTENCE_DONE.search(s)]
    slots: dict[int, list[str]] = {}
    for depth, text in needles:
        b = min(boundaries, key=lambda i: abs(cum[i] - depth * total))
        slots.setdefault(b, []).append(text)
    out: list[str] = []
    for i in range(len(sentences) + 1):
        out.extend(slots.get(i, ()))
        if i < len(sentences):
            out.append(sentences[i])
    return " ".join(out)


def fit_length(
    build: Callable[[int], tuple[str, list[int]]], length: int, max_units: int, what: str
) -> tuple[int, str, list[int]]:
    """The largest n in [0, max_units] whose prompt `build(n)` has at most `length` tokens.

    Binary search; the token count grows (almost) monotonically with n, and the returned prompt
    was measured, so it never exceeds `length` even where monotonicity slips.

    Raises:
        ValueError: if even `build(0)` (no filler: template, needles and question alone) is too long.
    """
    text, ids = build(0)
    if len(ids) > length:
        raise ValueError(
            f"length={length} is too small: the prompt without any {what} already has {len(ids)} tokens"
        )
    lo, best, hi = 0, (text, ids), max_units + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        text, ids = build(mid)
        if len(ids) <= length:
            lo, best = mid, (text, ids)
        else:
            hi = mid
    return lo, best[0], best[1]


def haystack_prompt(
    tokenizer,
    length: int,
    *,
    source: str,
    start: int,
    needles: Sequence[tuple[float, str]],
    instruction: str,
    question: str,
    answer_prefix: str,
    chat: bool | None,
) -> tuple[str, list[int], int]:
    """Fill a haystack around `needles` to at most `length` prompt tokens.

    Returns:
        (prompt text, token ids, number of haystack words used).
    """

    def build(n_words: int) -> tuple[str, list[int]]:
        sentences = split_sentences(" ".join(haystack_words(source, n_words, start)))
        context = insert_at_depths(sentences, needles)
        return build_prompt(tokenizer, instruction, context, question, answer_prefix, chat)

    # Every whitespace-separated word costs at least one token, so more than `length` words never fit.
    n, text, ids = fit_length(build, length, max_units=length, what="haystack (needles and question only)")
    return text, ids, n
