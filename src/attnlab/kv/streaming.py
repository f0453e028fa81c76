"""``streaming``: attention sinks plus a recent window.

"Efficient Streaming Language Models with Attention Sinks" (Xiao et al., ICLR 2024,
https://arxiv.org/abs/2309.17453). Keep the first ``n_sink`` tokens (the sinks) and the most recent
ones; during decoding the cache keeps its size, each new token replacing the oldest non-sink entry.

Note: StreamingLLM re-assigns positions inside the cache; here keys keep the positions they were
rotated with at prefill (transformers caches keys after RoPE), as kvpress does. Within the model's
context this changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Keep, Policy, PrefillView, same_for_all_heads


def streaming_index(length: int, n_keep: int, n_sink: int, device=None) -> torch.Tensor:
    """(n_keep,) ascending: the first min(n_sink, n_keep - 1) positions, then the most recent ones."""
    sinks = min(n_sink, n_keep - 1)
    recent = torch.arange(length - (n_keep - sinks), length, device=device)
    return torch.cat([torch.arange(sinks, device=device), recent])


@dataclass
class Streaming(Policy):
    """Sinks + recent window, constant size while decoding.

    Attributes:
        budget: fraction of the prompt's entries kept per head.
        n_sink: sink tokens (4 in the paper); at least one recent token is always kept.
    """

    n_sink: int = 4
    name: ClassVar[str] = "streaming"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"`n_sink` must be an int >= 0; got n_sink={self.n_sink!r}")

    def select(self, view: PrefillView) -> list[Keep]:
        index = streaming_index(view.length, self.n_keep(view.length), self.n_sink, view.keys.device)
        return same_for_all_heads(index, view.n_kv_heads, fixed_size=True)

    def evict(self, group, position: int) -> int | torch.Tensor:
        """The oldest entry that is not one of the ``n_sink`` oldest (the sinks).

        Returns the slot as an int shared by every row while the group is a ring (``group.ring``:
        slots hold the kept positions in ascending order, rotated by evictions): the oldest non-sink
        entry is then slot ``sinks + evicted mod (n - sinks)``, known on the host, so a decode step
        overwrites it in place with no device op to find it. Otherwise a (G,) tensor from the positions.
        """
        n = group.n
        sinks = min(self.n_sink, n - 1)
        if group.ring:
            return sinks + group.evicted % (n - sinks)
        pos = group.pos[:, :n]
        if sinks == 0:
            return pos.argmin(dim=1)
        # the (sinks + 1)-th smallest position is the oldest non-sink entry
        return pos.kthvalue(sinks + 1, dim=1).indices
