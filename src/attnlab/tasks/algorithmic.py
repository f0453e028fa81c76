"""The algorithmic tasks of positional attention: cumulative sum and min, and sort, over small value sets.

Paper: "Positional Attention: Expressivity and Learnability of Algorithmic Computation" (paper 42).
Each example draws an interval [low, high] uniformly inside [-scale, scale], then n values
uniformly from it. Targets, one per position: the running sum or running min of the values up to
that position (the paper's "cumulative" variants), or the values sorted ascending. Training on
short inputs (n = 8) and testing on longer ones (or on larger ``scale``) measures how the learned
algorithm generalises. The paper's extra scratch node is left out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .synthetic import Batch, ValueTask, check_positive, generator

OPERATIONS = ("sum", "min", "sort")


@dataclass(frozen=True)
class Algorithmic(ValueTask):
    """Attributes:
        op: "sum" (running sum), "min" (running min) or "sort" (ascending).
        seq_len: n values per example (paper: 8 in training).
        scale: values lie in [-scale, scale] (paper: 2 in training, up to 20 out of distribution).
    """

    op: str = "min"
    seq_len: int = 8
    scale: float = 2.0
    in_dim = 1
    causal = False  # sort needs every value; the cumulative ops are learnable either way

    def __post_init__(self) -> None:
        if self.op not in OPERATIONS:
            raise ValueError(f"`op` must be one of {OPERATIONS}; got op={self.op!r}")
        check_positive(seq_len=self.seq_len)
        if not self.scale > 0:
            raise ValueError(f"`scale` must be > 0; got scale={self.scale}")

    def sample(self, n: int, seed: int = 0) -> Batch:
        """inputs (n, seq_len, 1) float32 values; targets (n, seq_len) float32 answers."""
        check_positive(n=n)
        g = generator(seed)
        ends = (torch.rand(n, 2, generator=g) * 2 - 1) * self.scale
        low, high = ends.min(-1, keepdim=True).values, ends.max(-1, keepdim=True).values
        values = low + (high - low) * torch.rand(n, self.seq_len, generator=g)  # (n, seq_len)
        return Batch(values[..., None], answer(self.op, values))


def answer(op: str, values: torch.Tensor) -> torch.Tensor:
    """The exact answer of ``op`` for values (B, n): (B, n)."""
    if op == "sum":
        return values.cumsum(-1)
    if op == "min":
        return values.cummin(-1).values
    if op == "sort":
        return values.sort(-1).values
    raise ValueError(f"`op` must be one of {OPERATIONS}; got {op=}")
