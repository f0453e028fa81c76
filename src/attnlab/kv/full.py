"""``full``: keep every prompt entry (the uncompressed baseline, through the same ragged cache)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Keep, Policy, PrefillView, same_for_all_heads


@dataclass
class Full(Policy):
    """Keep everything; ``budget`` must be 1.

    With one group that holds every row in order, decode attention is transformers' own SDPA call,
    so greedy generation matches a plain cache token for token.
    """

    name: ClassVar[str] = "full"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget != 1.0:
            raise ValueError(f"the full policy keeps everything: `budget` must be 1.0; got budget={self.budget!r}")

    def select(self, view: PrefillView) -> list[Keep]:
        return same_for_all_heads(torch.arange(view.length, device=view.keys.device), view.n_kv_heads)
