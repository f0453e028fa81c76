"""The KV-cache policy contract: what a policy sees after prefill, and what it answers.

A policy is a small dataclass with one required method, ``select(view) -> list[Keep]``. It is called
once per layer and per sample after the prefill, with that sample's post-RoPE keys and values
(padding removed) and, if it asks for them, attention scores of the prompt's keys. It answers, per
group of KV heads, which prompt positions to keep (and, optionally, extra synthetic entries such as
RazorAttention's compensation token). :class:`attnlab.kv.cache.RaggedCache` then stores exactly
those entries: nothing is masked, the dropped entries are gone.

Optional hooks:
    ``scores``: class attribute, ``None`` (no scores), ``"window"`` (attention of the last
        ``window`` prompt queries, SnapKV) or ``"all"`` (attention accumulated over every prompt
        query, H2O). Scores are summed over the query heads of each KV head's GQA group.
    ``evict(group, position)``: for a ``Keep(fixed_size=True)`` group, which slot each row
        overwrites when a decoded token arrives and the group is full (StreamingLLM, H2O).
    ``tracks_scores``: class attribute; True makes decode attention accumulate each slot's
        attention mass into ``group.score`` (H2O's heavy-hitter statistic).
    ``prepare(model)``: one-time set-up from the model (RazorAttention's head scores).

Budget: the fraction of the prompt's KV bytes kept, in (0, 1], the same meaning for every policy;
``n_keep(T)`` turns it into entries per head for policies with one size for all heads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from .cache import Group


@dataclass(frozen=True)
class PrefillView:
    """One sample's prompt as one layer's cache saw it.

    Attributes:
        layer: layer index; n_layers: number of layers.
        keys: (H_kv, T, D) post-RoPE keys of the T real (non-padding) prompt tokens.
        values: (H_kv, T, D_v).
        scores: (H_kv, T) float32 attention mass each key received (see ``Policy.scores``), or None.
    """

    layer: int
    n_layers: int
    keys: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.keys.shape[1]

    @property
    def n_kv_heads(self) -> int:
        return self.keys.shape[0]


@dataclass(frozen=True)
class Keep:
    """What a group of KV heads keeps: the same number of entries for every head in the group.

    Attributes:
        heads: (G,) long, KV head indices.
        index: (G, L) long, kept prompt positions (into the view's T), ascending.
        extra_keys, extra_values: (G, E, D) / (G, E, D_v) synthetic entries stored after the kept
            ones (e.g. a compensation token), or None.
        extra_log_weight: (G, E) float, added to each extra entry's attention logit (log of how many
            tokens it stands for), or None for 0.
        fixed_size: True: decoding keeps this many entries, ``Policy.evict`` picks what a new token
            replaces; False: decoded tokens are appended.
    """

    heads: torch.Tensor
    index: torch.Tensor
    extra_keys: torch.Tensor | None = None
    extra_values: torch.Tensor | None = None
    extra_log_weight: torch.Tensor | None = None
    fixed_size: bool = False


def check_budget(budget: float, name: str = "budget") -> float:
    """A budget is the fraction of KV bytes kept, in (0, 1]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        raise ValueError(f"`{name}` must be a fraction of KV bytes in (0, 1]; got {name}={budget!r}")
    return float(budget)


@dataclass
class Policy:
    """Base of every KV-cache policy; subclasses set ``name`` and implement ``select``.

    Attributes:
        budget: fraction of the prompt's KV bytes kept, in (0, 1].
    """

    budget: float = 1.0

    name: ClassVar[str] = "policy"
    scores: ClassVar[str | None] = None  # None | "window" | "all"
    window: ClassVar[int] = 0  # prompt queries the "window" scores use
    tracks_scores: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.budget = check_budget(self.budget)

    def prepare(self, model) -> None:
        """One-time set-up from the model; the default needs nothing."""

    def select(self, view: PrefillView) -> list[Keep]:
        raise NotImplementedError

    def evict(self, group: "Group", position: int) -> torch.Tensor | None:
        """(G,) slot per row that a decoded token at ``position`` overwrites in a full fixed-size group."""
        return None

    def n_keep(self, length: int) -> int:
        """Entries per head for a prompt of ``length`` tokens: round(budget * length), at least 1."""
        return max(1, min(length, round(self.budget * length)))


def all_heads(n_kv_heads: int, device=None) -> torch.Tensor:
    """(H_kv,) long: every KV head."""
    return torch.arange(n_kv_heads, device=device)


def same_for_all_heads(index: torch.Tensor, n_kv_heads: int, **kw) -> list[Keep]:
    """One Keep for every head: ``index`` (L,) or (H_kv, L)."""
    if index.dim() == 1:
        index = index.unsqueeze(0).expand(n_kv_heads, -1)
    return [Keep(all_heads(n_kv_heads, index.device), index, **kw)]


def split_full_heads(full: torch.Tensor, length: int) -> tuple[list[Keep], torch.Tensor]:
    """For policies that keep some KV heads whole: ``full`` (H_kv,) bool -> ([Keep of those heads with all
    ``length`` positions] or [], the indices (G,) of the other heads, which the policy compresses)."""
    dev = full.device
    keeps = []
    if full.any():
        heads = full.nonzero().squeeze(1)
        keeps.append(Keep(heads, torch.arange(length, device=dev).expand(heads.shape[0], -1)))
    return keeps, (~full).nonzero().squeeze(1)


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(H, k) ascending indices of the k largest entries of each row of ``scores`` (H, N); ties by index."""
    if k <= 0:
        return torch.empty(scores.shape[0], 0, dtype=torch.long, device=scores.device)
    # stable descending sort: equal scores keep the earlier position first (deterministic)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=-1).values
