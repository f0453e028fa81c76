"""``h2o``: heavy hitters (most attended-to entries) plus recent tokens, evicting while decoding.

"H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models" (Zhang et al.,
NeurIPS 2023, https://arxiv.org/abs/2306.14048). A key's score is the attention it has accumulated
from every query so far (summed over each KV head's query group). After prefill each head keeps
its ``recent`` latest tokens and the heaviest of the rest (half the budget each, as the paper's
default heavy = recent ratio); each decoded token's attention is added to the scores, and when a new
token arrives the lightest non-recent entry makes room for it, so the cache keeps its size.

The prefill scores are recomputed in query chunks (O(chunk x T) memory), not taken from N x N maps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Keep, Policy, PrefillView, all_heads, top_k_sorted


@dataclass
class H2O(Policy):
    """Heavy hitters + recent window.

    Attributes:
        budget: fraction of the prompt's entries kept per head.
        recent_share: share of the kept entries reserved for the most recent tokens (0.5 in the paper).
    """

    recent_share: float = 0.5
    name: ClassVar[str] = "h2o"
    scores: ClassVar[str | None] = "all"
    tracks_scores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.recent_share, bool) or not isinstance(self.recent_share, (int, float)) \
                or not 0.0 <= self.recent_share <= 1.0:
            raise ValueError(f"`recent_share` must be in [0, 1]; got recent_share={self.recent_share!r}")

    def n_recent(self, n_keep: int) -> int:
        """Recent entries protected out of ``n_keep`` (at least one: the latest token)."""
        return min(n_keep, max(1, round(self.recent_share * n_keep)))

    def select(self, view: PrefillView) -> list[Keep]:
        T, n_keep = view.length, self.n_keep(view.length)
        r = self.n_recent(n_keep)
        heavy = top_k_sorted(view.scores[:, : T - r].float(), n_keep - r)
        recent = torch.arange(T - r, T, device=heavy.device).expand(view.n_kv_heads, -1)
        return [Keep(all_heads(view.n_kv_heads, heavy.device), torch.cat([heavy, recent], 1), fixed_size=True)]

    def evict(self, group, position: int) -> torch.Tensor:
        """The non-recent entry with the least accumulated attention, per row."""
        n = group.n
        pos, score = group.pos[:, :n], group.score[:, :n]
        r = self.n_recent(n)
        if r >= n:
            return pos.argmin(dim=1)
        # Recent entries are never evicted, so the r newest are exactly positions position-r ... position-1.
        return score.masked_fill(pos >= position - r, float("inf")).argmin(dim=1)
