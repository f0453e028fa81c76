"""Sliding-window (local) attention over 1-D positions, optionally causal.

Definition (the key count is exactly ``size`` wherever the window fits, odd or even):

- causal:     pos_q - size < j <= pos_q          (``size`` keys, the query's own included);
- non-causal: pos_q - size // 2 <= j <= pos_q + (size - 1) // 2
  (odd size 2r+1: r keys each side; even size 2r: r left, r-1 right, as NATTEN does).

``pos_q = i + (Nk - Nq)`` is the query's bottom-right aligned key position (see ``base``). The
window is *not* shifted at the borders (unlike ``neighborhood``): edge queries see fewer keys. In
FlashAttention's terms this is ``window_size=(left, right)`` with ``left, right = p.left, p.right``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ._args import check_int
from .intervals import IntervalPattern, print_mask


@dataclass(frozen=True)
class SlidingWindow(IntervalPattern):
    size: int
    causal: bool = False

    @property
    def left(self) -> int:
        """Keys before the query's own position that it may see."""
        return self.size - 1 if self.causal else self.size // 2

    @property
    def right(self) -> int:
        """Keys after the query's own position that it may see."""
        return 0 if self.causal else (self.size - 1) // 2

    def bounds(self, q, n_q, n_kv, device=None):
        pos = q + (n_kv - n_q)
        return pos - self.left, pos + self.right

    def __repr__(self):
        return f"sliding_window({self.size}, causal=True)" if self.causal else f"sliding_window({self.size})"


def sliding_window(size: int, causal: bool = False) -> SlidingWindow:
    """Each query sees the ``size`` keys around (or, causal, ending at) its aligned position.

    Args:
        size: keys in a full window, >= 1 (the query's own key included).
        causal: if True the window ends at the query (lookback of size - 1 keys).
    """
    check_int("size", size, 1)
    if not isinstance(causal, bool):
        raise ValueError(f"`causal` must be a bool; got causal={causal!r}")
    return SlidingWindow(size, causal)


def main() -> None:
    print_mask(sliding_window(5), 12, 12)
    print_mask(sliding_window(4, causal=True), 8, 12)


if __name__ == "__main__":
    main()
