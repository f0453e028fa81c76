"""MQAR, multi-query associative recall, as Zoology generates it.

Paper: "Zoology: Measuring and Improving Recall in Efficient Language Models" (paper 21).
An example is ``k1 v1 k2 v2 ... kK vK`` followed by query slots where each key appears once more,
at a power-law distributed gap; the model must emit the key's value right at the query. Keys come
from ``[1, V/2)``, values from ``[V/2, V)``, no repeats inside an example; the query region holds
zeros (or random tokens) elsewhere. Targets sit at the query key's position (inputs and labels are
already shifted, as in Zoology), so a causal model predicts the value from the key it just read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .synthetic import IGNORE, Batch, TokenTask, check_positive, generator


@dataclass(frozen=True)
class MQAR(TokenTask):
    """Zoology's MQAR geometry.

    Attributes:
        seq_len: tokens per example N (even; Zoology: 64-512).
        num_kv_pairs: K key-value pairs (4 K <= N; Zoology pairs (64, 4), (128, 8), (256, 16)).
        vocab_size: V > N (Zoology: 8192; smaller trains faster and is not easier for attention).
        power_a: exponent a of the gap law p(g) ~ a g^(a-1), g = 1..(N - 2K) / 2 (Zoology: 0.01,
            which favours short gaps).
        random_non_queries: fill the empty query slots with random tokens (Zoology's figure 2: False).
    """

    seq_len: int = 64
    num_kv_pairs: int = 4
    vocab_size: int = 8192
    power_a: float = 0.01
    random_non_queries: bool = False
    causal = True  # the answer comes right after reading the query key

    def __post_init__(self) -> None:
        check_positive(seq_len=self.seq_len, num_kv_pairs=self.num_kv_pairs, vocab_size=self.vocab_size)
        if self.seq_len % 2:
            raise ValueError(f"`seq_len` must be even; got seq_len={self.seq_len}")
        if 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(f"need 4 * num_kv_pairs <= seq_len; got num_kv_pairs={self.num_kv_pairs}, seq_len={self.seq_len}")
        if self.vocab_size <= self.seq_len or self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise ValueError(f"`vocab_size` must exceed seq_len and hold num_kv_pairs keys; got vocab_size={self.vocab_size}")
        if not self.power_a > 0:
            raise ValueError(f"`power_a` must be > 0; got power_a={self.power_a}")

    def sample(self, n: int, seed: int = 0) -> Batch:
        """``n`` examples: inputs (n, N) int64, targets (n, N) int64 (IGNORE except at queries)."""
        check_positive(n=n)
        g = generator(seed)
        k, half = self.num_kv_pairs, self.vocab_size // 2
        keys = _distinct(n, k, half - 1, g) + 1  # (n, K) in [1, V/2)
        values = _distinct(n, k, self.vocab_size - half, g) + half  # (n, K) in [V/2, V)
        context = torch.stack([keys, values], dim=-1).flatten(1)  # (n, 2K): k1 v1 k2 v2 ...
        space = (self.seq_len - 2 * k) // 2
        law = self.power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (self.power_a - 1)
        gaps = torch.multinomial(law.expand(n, space), k, replacement=False, generator=g)  # (n, K)
        queries = torch.zeros(n, self.seq_len - 2 * k, dtype=torch.long)
        queries.scatter_(1, 2 * gaps, keys)  # key i reappears at even offset 2 * gap_i
        inputs = torch.cat([context, queries], dim=1)  # (n, N)
        targets = torch.full_like(inputs, IGNORE)
        targets.scatter_(1, 2 * k + 2 * gaps, values)
        if self.random_non_queries:
            noise = torch.randint(self.vocab_size, inputs.shape, generator=g)
            empty = inputs == 0
            inputs[empty] = noise[empty]
        return Batch(inputs, targets)


def _distinct(n: int, k: int, size: int, g: torch.Generator) -> Tensor:
    """(n, k) int64: k distinct draws from range(size) per row."""
    return torch.rand(n, size, generator=g).argsort(dim=1)[:, :k]


def recall_answers(inputs: Tensor, num_kv_pairs: int) -> Tensor:
    """What a perfect recaller answers at every position: the value paired with the token read there
    in the context, or IGNORE for tokens that are no key. inputs (B, N) -> (B, N) int64.

    This is the exact scorer's ground truth read back from the context alone (no labels used).
    """
    k = num_kv_pairs
    keys, values = inputs[:, 0 : 2 * k : 2], inputs[:, 1 : 2 * k : 2]  # (B, K)
    hit = inputs[:, :, None] == keys[:, None, :]  # (B, N, K)
    hit[:, : 2 * k] = False  # the context itself asks nothing
    answer = torch.where(hit, values[:, None, :], IGNORE).max(dim=-1).values
    return torch.where(hit.any(-1), answer, IGNORE)
