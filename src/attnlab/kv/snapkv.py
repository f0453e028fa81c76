"""``snapkv``: keep the prompt entries the last queries vote for, plus the observation window.

"SnapKV: LLM Knows What You are Looking for Before Generation" (Li et al., NeurIPS 2024,
https://arxiv.org/abs/2404.14469). The last ``window`` prompt queries (the observation window)
score every earlier key by the attention they pay it, summed over the window and over each KV head's
query group; the votes are smoothed by 1D average pooling (kernel 5, "clustering") and each head keeps
its top entries plus the whole window. One choice per KV head (GQA), made once after prefill.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Keep, Policy, PrefillView, all_heads, top_k_sorted
from .scores import WINDOW


def pool_votes(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """(H, N) -> (H, N) average over a centered window of ``kernel`` positions (zero padded, as SnapKV)."""
    if kernel <= 1 or scores.shape[1] == 0:
        return scores
    return F.avg_pool1d(scores.unsqueeze(1), kernel, stride=1, padding=kernel // 2,
                        count_include_pad=True).squeeze(1)[:, : scores.shape[1]]


@dataclass
class SnapKV(Policy):
    """Observation-window votes + the window itself.

    Attributes:
        budget: fraction of the prompt's entries kept per head.
        kernel: average-pooling width over the votes (odd; 5 in the paper).
    """

    kernel: int = 5
    name: ClassVar[str] = "snapkv"
    scores: ClassVar[str | None] = "window"
    window: ClassVar[int] = WINDOW

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.kernel, bool) or not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"`kernel` must be an odd int >= 1; got kernel={self.kernel!r}")

    def select(self, view: PrefillView) -> list[Keep]:
        T, n_keep = view.length, self.n_keep(view.length)
        w = min(self.window, n_keep, T)  # a budget below the window keeps the latest n_keep tokens
        votes = pool_votes(view.scores[:, : T - w].float(), self.kernel)  # (H_kv, T - w)
        chosen = top_k_sorted(votes, n_keep - w)
        window = torch.arange(T - w, T, device=chosen.device).expand(view.n_kv_heads, -1)
        return [Keep(all_heads(view.n_kv_heads, chosen.device), torch.cat([chosen, window], 1))]
