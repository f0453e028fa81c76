"""The 1-layer next-token setting of Scan and Snap: the query token plus context decide the next token.

Paper: "Scan and Snap: Understanding Training Dynamics and Token Composition in 1-layer
Transformer" (paper 34). Each sequence class is a pair (query m, next token n): ``n_queries``
query tokens, each with ``next_per_query`` possible next tokens. The context before the query is
``context_len`` tokens drawn from the class's own distribution: with probability ``p_common`` a
token shared by all classes ("common"), otherwise one of the class's ``distinct_per_class``
"distinct" tokens. The last position reads the query m and must predict n, which only the
distinct context tokens reveal. The paper's model: one attention layer plus a decoder, no
positional encoding; its finding is that attention "scans" toward distinct tokens and then
"snaps" (freezes) at a mixture set by the learning rates.

Vocabulary: [common | distinct (class-major) | queries | next tokens].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .synthetic import IGNORE, Batch, TokenTask, check_positive, generator


@dataclass(frozen=True)
class ScanSnap(TokenTask):
    """Attributes:
        n_queries: M query tokens.
        next_per_query: K next tokens per query (classes = M K pairs).
        n_common: tokens shared by every class.
        distinct_per_class: tokens unique to each (m, n) class.
        context_len: T context tokens before the query (the paper assumes long inputs).
        p_common: chance that a context token is common rather than distinct.
    """

    n_queries: int = 2
    next_per_query: int = 4
    n_common: int = 8
    distinct_per_class: int = 4
    context_len: int = 31
    p_common: float = 0.5
    causal = True  # next-token prediction; only the last position is scored

    def __post_init__(self) -> None:
        check_positive(n_queries=self.n_queries, next_per_query=self.next_per_query, n_common=self.n_common,
                       distinct_per_class=self.distinct_per_class, context_len=self.context_len)
        if not 0.0 <= self.p_common < 1.0:
            raise ValueError(f"`p_common` must lie in [0, 1); got p_common={self.p_common}")

    @property
    def n_classes_pairs(self) -> int:
        return self.n_queries * self.next_per_query

    @property
    def first_query(self) -> int:
        return self.n_common + self.n_classes_pairs * self.distinct_per_class

    @property
    def first_next(self) -> int:
        return self.first_query + self.n_queries

    @property
    def vocab_size(self) -> int:
        return self.first_next + self.n_classes_pairs

    @property
    def seq_len(self) -> int:
        return self.context_len + 1

    def sample(self, n: int, seed: int = 0) -> Batch:
        """inputs (n, T + 1) int64: context then query; targets (n, T + 1): the next token at the last position."""
        check_positive(n=n)
        g = generator(seed)
        cls = torch.randint(self.n_classes_pairs, (n,), generator=g)  # class c = m * K + k
        common = torch.randint(self.n_common, (n, self.context_len), generator=g)
        distinct = self.n_common + cls[:, None] * self.distinct_per_class + torch.randint(
            self.distinct_per_class, (n, self.context_len), generator=g)
        use_common = torch.rand(n, self.context_len, generator=g) < self.p_common
        context = torch.where(use_common, common, distinct)
        query = self.first_query + cls // self.next_per_query
        inputs = torch.cat([context, query[:, None]], dim=1)
        targets = torch.full_like(inputs, IGNORE)
        targets[:, -1] = self.first_next + cls
        return Batch(inputs, targets)

    def bayes_answer(self, inputs: Tensor) -> Tensor:
        """The exact answer read from the context: the class of any distinct token (with the query's
        group), or IGNORE when the context holds only common tokens. inputs (B, T + 1) -> (B,)."""
        ctx = inputs[:, :-1]
        is_distinct = (ctx >= self.n_common) & (ctx < self.first_query)
        cls = torch.where(is_distinct, (ctx - self.n_common) // self.distinct_per_class, -1).max(-1).values
        return torch.where(cls >= 0, self.first_next + cls, IGNORE)
