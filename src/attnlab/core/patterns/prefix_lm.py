"""Prefix-LM attention: a bidirectional prefix, causal after it.

From "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer" (T5): every
query sees the whole prefix (keys ``j < prefix_len``) and, causally, every key up to its own aligned
position ``pos_q = i + (Nk - Nq)``. So prefix queries see the whole prefix; later ones see
everything up to themselves. ``prefix_len`` counts key positions; ``prefix_lm(0)`` is ``causal()``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._args import check_int
from .intervals import IntervalPattern, print_mask


@dataclass(frozen=True)
class PrefixLM(IntervalPattern):
    prefix_len: int

    def bounds(self, q, n_q, n_kv, device=None):
        pos = q + (n_kv - n_q)
        return torch.zeros_like(pos), torch.clamp(pos, min=self.prefix_len - 1)

    def mask_mod(self, n_q, n_kv, device=None):
        offset, prefix = n_kv - n_q, self.prefix_len
        return lambda b, h, q, k: (k < prefix) | (q + offset >= k)

    def __repr__(self):
        return f"prefix_lm({self.prefix_len})"


def prefix_lm(prefix_len: int) -> PrefixLM:
    """Bidirectional attention among the first ``prefix_len`` keys, causal for the rest.

    Args:
        prefix_len: number of leading key positions every query sees, >= 0.
    """
    check_int("prefix_len", prefix_len, 0)
    return PrefixLM(prefix_len)


def main() -> None:
    print_mask(prefix_lm(4), 10, 10)


if __name__ == "__main__":
    main()
