"""Reductions of a probability chunk shared by several observers, cached for the latest chunk.

Key-range masses (distance buckets, pooled key bins) are differences of the row prefix sum, so one
``cumsum`` pass serves them all. Sums over groups of query rows (thumbnail row bins) also give the
column sums (column mass) for free. The attached attention call hands the same chunk to every
observer, so the second observer asking gets the cached result.
"""
from __future__ import annotations

import torch

_cache: list = [None, None, None]  # [probs (held, so its memory cannot be reused), key, cumsum]
_groups: list = [None, None, None]  # [probs (held), key, (..., G, Nk) row-group sums]


def _key(probs: torch.Tensor) -> tuple:
    # _version: the attention call may rewrite the same buffer, same shape, for the next chunk
    return (probs.data_ptr(), tuple(probs.shape), probs.stride(), probs._version, probs.dtype, probs.device)


def row_cumsum(probs: torch.Tensor) -> torch.Tensor:
    """(..., Nk) inclusive cumulative sum of ``probs`` along keys, cached for the latest chunk."""
    key = _key(probs)
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


def row_group_sums(probs: torch.Tensor, groups: int) -> torch.Tensor:
    """(..., G, Nk) sums of ``probs`` (..., C, Nk) over G equal runs of consecutive rows (C % G == 0).

    Cached for the latest chunk, so that :func:`column_sums` of the same chunk costs no pass.
    """
    *lead, c, n_kv = probs.shape
    if groups < 1 or c % groups:
        raise ValueError(f"`groups` must divide the {c} rows of the chunk; got {groups=}")
    key = _key(probs) + (groups,)
    if _groups[1] != key:
        _groups[0], _groups[1] = probs, key
        _groups[2] = probs.reshape(*lead, groups, c // groups, n_kv).sum(dim=-2)
    return _groups[2]


def column_sums(probs: torch.Tensor) -> torch.Tensor:
    """(..., Nk) sums of ``probs`` (..., C, Nk) over its rows; from cached row-group sums when the
    same chunk already has them (see :func:`row_group_sums`), else one pass."""
    if _groups[1] is not None and _groups[1][:-1] == _key(probs):
        return _groups[2].sum(dim=-2)
    return probs.sum(dim=-2)


def clear() -> None:
    """Drop the cached chunk (frees its memory)."""
    _cache[0] = _cache[1] = _cache[2] = None
    _groups[0] = _groups[1] = _groups[2] = None
