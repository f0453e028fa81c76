"""Shared geometry for patterns where each query sees one contiguous run of keys.

Sliding windows, prefix-LM and packed documents are ``IntervalPattern``s: query i sees keys
``lo(i) <= j <= hi(i)`` with ``lo`` and ``hi`` non-decreasing in i. That monotonicity is what makes
their block layout exact and cheap: the queries of a tile that can reach a key tile form one
interval, found with two look-ups in counting tables (``window_tiles``). Grid patterns reuse ``window_tiles``
per axis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from .base import BlockLayout, Pattern

# Pads a window table past its end; larger than any index, so padded rows never match a key.
BIG = 2**62


def tile_bounds(n: int, block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """First and last index (inclusive) of each tile of ``block`` positions over n: two (ceil(n/block),)."""
    first = torch.arange(0, n, block)
    return first, torch.clamp(first + block, max=n) - 1


def reach_tables(lo: torch.Tensor, hi: torch.Tensor, n_keys: int):
    """For each key v, the last query whose window starts at or before v and the first query whose
    window ends at or after v: two (G, n_keys) tables, by counting (the windows are monotone)."""
    g = lo.shape[0]
    offsets = (torch.arange(g) * (n_keys + 1))[:, None]

    def cumulative_count(values):  # [number of rows with value <= v for v in 0..n_keys] per group
        counts = torch.bincount((values.clamp(0, n_keys) + offsets).view(-1), minlength=g * (n_keys + 1))
        return counts.view(g, n_keys + 1).cumsum(1)

    last_starting = cumulative_count(lo)[:, :n_keys] - 1  # lo <= v
    first_ending = cumulative_count(hi + 1)[:, :n_keys]  # hi < v, i.e. hi + 1 <= v
    return last_starting, first_ending


def window_tiles(lo, hi, q_first, q_last, k_first, k_last, n_keys: int, nonempty=None):
    """Which (query interval, key interval) pairs touch / are full, for monotone windows.

    Args:
        lo, hi: (G, L) int64; row g gives, for each query c, its window ``lo <= key <= hi``.
            Both non-decreasing along L (pad rows with BIG); a window may be empty only where hi < 0
            or lo > every key, so that the two look-ups below never pick an empty window, unless
            ``nonempty`` is given.
        q_first, q_last: (G, ...) inclusive query intervals (non-empty, inside [0, L)).
        k_first, k_last: (G, ...) inclusive key intervals (non-empty, inside [0, n_keys)); q and k
            shapes broadcast ((G, U, 1) with (G, 1, V) for all pairs, or equal shapes for given pairs).
        n_keys: keys per group.
        nonempty: optional (G, L + 1) running count of non-empty windows (0 first): then empty
            windows may lie anywhere, and a touch needs a non-empty window among the candidates.

    Returns:
        touched, full: bool, the broadcast shape. touched: some query of the interval sees some key
        of the key interval; full: every query sees every key.
    """
    g = lo.shape[0]
    last_starting, first_ending = reach_tables(lo, hi, n_keys)
    # Queries whose window starts at or before the key interval's end form a prefix [0, reach_lo];
    # those whose window ends at or after its start form a suffix [reach_hi, L). Touched iff the
    # query interval meets both: comparisons only (cheaper than max/min).
    reach_lo = last_starting.gather(1, k_last.reshape(g, -1)).view(k_last.shape)
    reach_hi = first_ending.gather(1, k_first.reshape(g, -1)).view(k_first.shape)
    touched = (q_first <= reach_lo) & (reach_hi <= q_last) & (reach_hi <= reach_lo)
    if nonempty is not None:
        # Every query in [max(q_first, reach_hi), min(q_last, reach_lo)] reaches the key interval
        # if its window is non-empty; count those.
        first = torch.maximum(q_first, reach_hi).clamp(0, lo.shape[1] - 1)
        last = torch.minimum(q_last, reach_lo).clamp(0, lo.shape[1] - 1)
        shape = torch.broadcast_shapes(first.shape, last.shape)
        after = nonempty.gather(1, (last + 1).expand(shape).reshape(g, -1))
        before = nonempty.gather(1, first.expand(shape).reshape(g, -1))
        touched &= (after > before).view(shape)
    # Full iff the last query's window starts early enough and the first query's ends late enough.
    lo_last = lo.gather(1, q_last.reshape(g, -1)).view(q_last.shape)
    hi_first = hi.gather(1, q_first.reshape(g, -1)).view(q_first.shape)
    full = (lo_last <= k_first) & (hi_first >= k_last)
    return touched, full


class IntervalPattern(Pattern):
    """Base of 1-D patterns whose query i sees keys ``lo(i) <= j <= hi(i)``, both non-decreasing.

    Subclasses implement ``bounds(q, n_q, n_kv, device) -> (lo, hi)`` with torch ops on an int64
    index tensor q (any shape); the same function builds the FlexAttention mask_mod and the exact
    tables behind ``block_layout`` and ``density``.
    """

    def bounds(self, q: torch.Tensor, n_q: int, n_kv: int, device=None):
        raise NotImplementedError

    def check_lengths(self, n_q: int, n_kv: int) -> None:
        """Raise ValueError when the pattern cannot describe an (n_q, n_kv) attention."""

    def mask_mod(self, n_q, n_kv, device=None):
        self.check_lengths(n_q, n_kv)

        def mod(b, h, q, k):
            lo, hi = self.bounds(q, n_q, n_kv, device)
            return (lo <= k) & (k <= hi)

        return mod

    def _tables(self, n_q: int, n_kv: int):
        """(lo, hi): (Nq,) int64 inclusive windows clamped to [0, Nk] and [-1, Nk - 1]; empty: hi < lo."""
        self.check_lengths(n_q, n_kv)
        lo, hi = self.bounds(torch.arange(n_q), n_q, n_kv)
        return lo.clamp(0, n_kv), hi.clamp(-1, n_kv - 1)

    def __and__(self, other):
        # Two windows meet in a window, so the intersection keeps exact closed forms.
        return IntervalAnd(self, other) if isinstance(other, IntervalPattern) else super().__and__(other)

    def density(self, n_q, n_kv):
        lo, hi = self._tables(n_q, n_kv)
        return float((hi - lo + 1).clamp(min=0).sum()) / (n_q * n_kv)

    def block_layout(self, n_q, n_kv, q_block=128, kv_block=128):
        lo, hi = self._tables(n_q, n_kv)
        q_first, q_last = tile_bounds(n_q, q_block)
        k_first, k_last = tile_bounds(n_kv, kv_block)
        nonempty = torch.nn.functional.pad((hi >= lo).long().cumsum(0), (1, 0))[None]  # (1, Nq + 1)
        touched, full = window_tiles(
            lo[None], hi[None], q_first[None, :, None], q_last[None, :, None], k_first[None, None], k_last[None, None],
            n_kv, nonempty,
        )
        touched, full = touched[0], full[0] & touched[0]
        return BlockLayout(full, touched & ~full, q_block, kv_block)


@dataclass(frozen=True)
class IntervalAnd(IntervalPattern):
    """``a & b`` of two interval patterns: the window ``max(lo_a, lo_b) <= j <= min(hi_a, hi_b)``."""

    a: IntervalPattern
    b: IntervalPattern

    def check_lengths(self, n_q, n_kv):
        self.a.check_lengths(n_q, n_kv)
        self.b.check_lengths(n_q, n_kv)

    def bounds(self, q, n_q, n_kv, device=None):
        lo_a, hi_a = self.a.bounds(q, n_q, n_kv, device)
        lo_b, hi_b = self.b.bounds(q, n_q, n_kv, device)
        return torch.maximum(lo_a, lo_b), torch.minimum(hi_a, hi_b)

    def mask_mod(self, n_q, n_kv, device=None):
        # The parts' own mask_mods (e.g. document's one gather) are cheaper than gathered bounds.
        fa, fb = self.a.mask_mod(n_q, n_kv, device), self.b.mask_mod(n_q, n_kv, device)
        return lambda b, h, q, k: fa(b, h, q, k) & fb(b, h, q, k)

    def __repr__(self):
        return f"({self.a!r} & {self.b!r})"


def print_mask(pattern: Pattern, n_q: int, n_kv: int) -> None:
    """Draw the (Nq, Nk) mask as text: '#' may attend, '.' may not (the patterns' ``main()``)."""
    print(repr(pattern), f"Nq={n_q} Nk={n_kv} density={pattern.density(n_q, n_kv):.3f}")
    for row in pattern.mask(n_q, n_kv).tolist():
        print(" ".join("#" if x else "." for x in row))
