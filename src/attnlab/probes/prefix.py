"""Row prefix sums of a probability chunk, shared by the observers that read ranges of keys.

Key-range masses (distance buckets, pooled key bins) are differences of the row prefix sum, so one
``cumsum`` pass serves them all. The last chunk's prefix sum is cached: the attached attention call
hands the same chunk to every observer, so the second observer asking gets it for free.
"""
from __future__ import annotations

import torch

_cache: list = [None, None, None]  # [probs (held, so its memory cannot be reused), key, cumsum]


def row_cumsum(probs: torch.Tensor) -> torch.Tensor:
    """(..., Nk) inclusive cumulative sum of ``probs`` along keys, cached for the latest chunk."""
    key = (probs.data_ptr(), tuple(probs.shape), probs.stride(), probs._version, probs.dtype)
    if _cache[1] != key:
        _cache[0], _cache[1], _cache[2] = probs, key, probs.cumsum(dim=-1)
    return _cache[2]


def mass_before(cs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Sum of p_j over j < index, from the inclusive cumsum ``cs`` (..., C, Nk).

    Args:
        index: (C, K) long in [0, Nk]; broadcast over the leading dims of ``cs``.
    Returns:
        (..., C, K).
    """
    idx = (index - 1).clamp_min(0).to(cs.device)
    out = cs.gather(-1, idx.expand(*cs.shape[:-2], -1, -1))
    return out * (index > 0).to(device=cs.device, dtype=cs.dtype)


def clear() -> None:
    """Drop the cached chunk (frees its memory)."""
    _cache[0] = _cache[1] = _cache[2] = None
