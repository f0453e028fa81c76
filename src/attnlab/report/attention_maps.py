"""Pooled attention maps for the report's thumbnails, gathered by a streaming observer.

A thumbnail of an (Nq, Nk) attention map is the map max-pooled to at most (size, size) cells:
each cell holds the largest probability any query in its row block gives any key in its column
block, so a one-token-wide pattern (previous token, a sink column) stays visible after pooling.
Memory is O(layers x heads x size^2), independent of N.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..probes.base import CallContext, Observer


@dataclass
class PooledAttentionMaps(Observer):
    """Max-pools every head's attention map to at most ``size`` x ``size`` cells.

    Args:
        size: cells per side of a pooled map; blocks are ceil(N / size) tokens wide.
        heads: (layer, head) pairs to keep, or None for all heads.
    """

    size: int = 128
    heads: set[tuple[int, int]] | None = None
    _maps: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # layer -> (H, Sq, Sk)
    _geometry: dict[int, tuple[int, int, int, int, bool]] = field(default_factory=dict, repr=False)
    _kept: dict[int, list[int]] = field(default_factory=dict, repr=False)  # layer -> head ids in _maps

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive int, got {self.size=}")

    def _head_index(self, layer: int, n_heads: int) -> list[int] | None:
        if self.heads is None:
            return None
        return [h for h in range(n_heads) if (layer, h) in self.heads]

    def observe(self, ctx: CallContext, q_start: int, probs: torch.Tensor) -> None:
        """probs: (B, Hq, C, Nk) float32 rows ``q_start : q_start + C`` of layer ``ctx.layer``."""
        b, n_heads, c, n_k = probs.shape
        keep = self._head_index(ctx.layer, n_heads)
        if keep is not None:
            if not keep:
                return
            probs = probs[:, keep]
        bq, bk = math.ceil(ctx.n_q / self.size), math.ceil(n_k / self.size)
        sq, sk = math.ceil(ctx.n_q / bq), math.ceil(n_k / bk)
        if ctx.layer not in self._maps:
            self._maps[ctx.layer] = torch.zeros(probs.shape[1], sq, sk)
            self._geometry[ctx.layer] = (bq, bk, ctx.n_q, n_k, ctx.causal)
            self._kept[ctx.layer] = list(range(n_heads)) if keep is None else keep
        pad = sk * bk - n_k
        # (B, H, C, Sk): the max over each key block, then over the batch.
        cols = torch.nn.functional.pad(probs, (0, pad)).view(b, probs.shape[1], c, sk, bk).amax(dim=-1).amax(dim=0)
        rows = (torch.arange(q_start, q_start + c) // bq).view(1, c, 1).expand_as(cols)  # row block of each query
        self._maps[ctx.layer].scatter_reduce_(1, rows, cols.float(), reduce="amax", include_self=True)

    def reset(self) -> None:
        self._maps.clear()
        self._geometry.clear()
        self._kept.clear()

    def maps(self) -> dict[tuple[int, int], np.ndarray]:
        """(layer, head) -> pooled map (Sq, Sk) float32; blocks no query may see are NaN (causal)."""
        out = {}
        for layer, m in sorted(self._maps.items()):
            bq, bk, n_q, n_k, causal = self._geometry[layer]
            a = m.numpy().copy()
            if causal:
                # Key block j is invisible to query block i when its first key comes after the
                # block's last query (bottom-right aligned: query i sees keys <= i + n_k - n_q).
                last_q = np.minimum((np.arange(a.shape[1]) + 1) * bq, n_q) - 1 + (n_k - n_q)
                first_k = np.arange(a.shape[2]) * bk
                a[:, first_k[None, :] > last_q[:, None]] = np.nan
            for i, h in enumerate(self._kept[layer]):
                out[(layer, h)] = a[i]
        return out

    def result(self) -> dict:
        return {f"{l}.{h}": np.round(np.nan_to_num(m, nan=-1.0), 5).tolist() for (l, h), m in self.maps().items()}
