"""ListOps as Long Range Arena generates it: nested MIN / MAX / MED / SM lists over digits, 10 classes.

Paper: "Long Range Arena: A Benchmark for Efficient Transformers" (its ListOps task, after Nangia &
Bowman). A tree node becomes an operator with probability 0.25 while depth < max_depth, taking
2..max_args arguments; otherwise it is a digit 0-9. MED is the (integer-truncated) median, SM the
sum mod 10. Trees are drawn until their token count falls inside [min_tokens, max_tokens] (LRA:
500 < length < 2000; the defaults here are CPU-sized). Serialised without LRA's tuple
parentheses: ``[MAX 2 9 [MIN 4 7 ] 0 ]``. A CLS token leads each example and carries the label;
examples are right-padded with PAD.
"""
from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

import torch

from .synthetic import IGNORE, Batch, TokenTask, check_positive, check_seed

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
VOCAB = ("<pad>", "<cls>", *(str(d) for d in range(10)), *OPERATORS, "]")
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
PAD, CLS = 0, 1


@dataclass(frozen=True)
class ListOps(TokenTask):
    """Attributes:
        max_depth: deepest operator nesting (LRA: 10).
        max_args: most arguments of an operator (LRA: 10).
        min_tokens, max_tokens: kept tree sizes in tokens, CLS excluded (LRA: 500-2000).
        seq_len: padded length N (>= max_tokens + 1).
    """

    max_depth: int = 4
    max_args: int = 5
    min_tokens: int = 16
    max_tokens: int = 63
    seq_len: int = 64
    vocab_size = len(VOCAB)
    causal = False

    def __post_init__(self) -> None:
        check_positive(max_depth=self.max_depth, min_tokens=self.min_tokens, max_tokens=self.max_tokens)
        if self.max_args < 2:
            raise ValueError(f"`max_args` must be >= 2; got max_args={self.max_args}")
        if not self.min_tokens <= self.max_tokens < self.seq_len:
            raise ValueError(f"need min_tokens <= max_tokens < seq_len; got {self.min_tokens}, {self.max_tokens}, {self.seq_len}")

    @property
    def n_classes(self) -> int:
        return self.vocab_size  # the digits' token ids are the classes; other outputs go unused

    def sample(self, n: int, seed: int = 0) -> Batch:
        """inputs (n, seq_len) int64 [CLS tokens PAD...]; targets (n, seq_len): the answer digit's
        token id at position 0, IGNORE elsewhere."""
        check_positive(n=n)
        rng = random.Random(check_seed(seed))
        inputs = torch.full((n, self.seq_len), PAD, dtype=torch.long)
        targets = torch.full((n, self.seq_len), IGNORE, dtype=torch.long)
        for i in range(n):
            tokens = self.draw_tokens(rng)
            inputs[i, 0] = CLS
            inputs[i, 1 : len(tokens) + 1] = torch.tensor([TOKEN_ID[t] for t in tokens])
            targets[i, 0] = TOKEN_ID[str(evaluate(tokens))]
        return Batch(inputs, targets)

    def draw_tokens(self, rng: random.Random) -> list[str]:
        """One tree's tokens with min_tokens <= len <= max_tokens (rejection sampling, as LRA)."""
        for _ in range(100_000):
            tokens = _tree(rng, 1, self.max_depth, self.max_args)
            if self.min_tokens <= len(tokens) <= self.max_tokens:
                return tokens
        raise ValueError(f"no tree of {self.min_tokens}-{self.max_tokens} tokens in 100,000 draws; widen the range or raise max_depth/max_args")


def _tree(rng: random.Random, depth: int, max_depth: int, max_args: int) -> list[str]:
    if depth >= max_depth or rng.random() > 0.25:
        return [str(rng.randrange(10))]
    op = rng.choice(OPERATORS)
    args = [_tree(rng, depth + 1, max_depth, max_args) for _ in range(rng.randint(2, max_args))]
    return [op, *(t for a in args for t in a), "]"]


def evaluate(tokens: list[str]) -> int:
    """The exact value of a serialised ListOps expression (a digit 0-9)."""
    stack: list[list] = [[]]
    for t in tokens:
        if t in OPERATORS:
            stack.append([t])
        elif t == "]":
            op, *args = stack.pop()
            stack[-1].append(_apply(op, args))
        else:
            stack[-1].append(int(t))
    if len(stack) != 1 or len(stack[0]) != 1:
        raise ValueError(f"`tokens` is not one balanced expression; got {' '.join(tokens)!r}")
    return stack[0][0]


def _apply(op: str, args: list[int]) -> int:
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[MED":
        return int(statistics.median(args))
    return sum(args) % 10


def decode(ids: torch.Tensor) -> list[str]:
    """Token ids (N,) back to ListOps tokens, CLS and PAD dropped."""
    return [VOCAB[i] for i in ids.tolist() if i not in (PAD, CLS)]
