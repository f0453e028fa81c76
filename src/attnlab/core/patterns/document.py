"""Packed sequences: several documents share one row and attend only within their own document.

The documents lie back to back: document d covers positions
``sum(lengths[:d]) <= i < sum(lengths[:d + 1])``, and ``sum(lengths)`` must equal Nq == Nk (packing
is self-attention; for cross attention pack the keys and split queries yourself). Combine with
``causal()`` for packed causal LM training: ``document(lengths) & causal()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from .base import on_device_of
from .intervals import IntervalPattern, print_mask


@dataclass(frozen=True)
class Document(IntervalPattern):
    lengths: Tuple[int, ...]

    def check_lengths(self, n_q, n_kv):
        total = sum(self.lengths)
        if n_q != total or n_kv != total:
            raise ValueError(
                f"document() needs n_q == n_kv == sum(lengths) = {total}; got {n_q=}, {n_kv=}"
            )

    def _doc_ids(self, device=None) -> torch.Tensor:
        """(N,) int64: the document of each position."""
        lengths = torch.tensor(self.lengths, device=device)
        return torch.repeat_interleave(torch.arange(len(self.lengths), device=device), lengths)

    def bounds(self, q, n_q, n_kv, device=None):
        ends = torch.cumsum(torch.tensor(self.lengths, device=device), 0)
        doc = self._doc_ids(device)[q]
        return (ends - torch.tensor(self.lengths, device=device))[doc], ends[doc] - 1

    def mask_mod(self, n_q, n_kv, device=None):
        self.check_lengths(n_q, n_kv)
        doc = self._doc_ids(device)  # captured: one gather per index is all the kernel pays
        return lambda b, h, q, k: on_device_of(doc, q)[q] == on_device_of(doc, k)[k]

    def __repr__(self):
        return f"document({list(self.lengths)})"


def document(lengths) -> Document:
    """Attention restricted to each of the packed documents.

    Args:
        lengths: the documents' lengths in order, each >= 1 (a sequence of ints or a 1-D tensor).
    """
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.tolist()
    ok = (
        isinstance(lengths, (list, tuple))
        and len(lengths) >= 1
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in lengths)
    )
    if not ok:
        raise ValueError(f"`lengths` must be a non-empty sequence of integers >= 1; got lengths={lengths!r}")
    return Document(tuple(lengths))


def main() -> None:
    print_mask(document([3, 5, 2]), 10, 10)


if __name__ == "__main__":
    main()
