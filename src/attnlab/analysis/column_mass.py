"""Streaming column mass: the mean attention each key receives from the queries that can see it.

alpha^{l,h}_k = (sum over queries i that can see key k of A^{l,h}_{i,k}) / (number of such queries),
the normalisation of "When Attention Sink Emerges in Language Models: An Empirical View" (Gu et al.,
arXiv 2410.10781) and of ACT ("Unveiling and Harnessing Hidden Attention Sinks", Yu et al., ICML
2024). Under a causal mask key k (0-based) is seen by T - k queries, without one by all T; padded
queries and keys are left out. Shared by :mod:`.sinks` and :mod:`.hidden_sinks`.

State per layer and sample: column sums (S, H, Nk) and visible-query counts (S, Nk): O(L*H*Nk).
Calls of one layer accumulate into the same samples (generation: prefill then decode steps) until a
call whose first query is at position 0 starts new samples (a fresh forward pass).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..probes.base import CallContext, Observer
from ..probes.prefix import column_sums
from ..probes.visibility import chunk_positions, first_real_key, key_limit, query_valid, visible_per_key


def _grow(t: torch.Tensor, n: int) -> torch.Tensor:
    """Zero-pad the last dim of ``t`` to length ``n``."""
    if t.shape[-1] >= n:
        return t
    return torch.nn.functional.pad(t, (0, n - t.shape[-1]))


class ColumnMassObserver(Observer):
    """Accumulates alpha (see module doc) per layer, head and key; read with :meth:`alphas`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        # layer -> list of sample groups {"sum": (S, H, Nk) f64, "count": (S, Nk) f64, "first": (S,)}
        self._groups: dict[int, list[dict]] = {}
        self.n_layers: int | None = None

    narrow_ok = True

    def observe(self, ctx: CallContext, q_start: int, probs: torch.Tensor) -> None:
        b, h, c, _ = probs.shape
        n_kv = ctx.n_kv
        self.n_layers = ctx.n_layers
        groups = self._groups.setdefault(ctx.layer, [])
        fresh = q_start == 0 and int(chunk_positions(ctx, 0, 1)[0]) == 0
        if fresh or not groups:
            groups.append({
                "sum": torch.zeros(b, h, n_kv, dtype=torch.float64),
                "count": torch.zeros(b, n_kv, dtype=torch.float64),
                "first": first_real_key(ctx.key_padding, b),
            })
        g = groups[-1]
        if g["sum"].shape[:2] != (b, h):
            raise ValueError(f"a continued call must keep (B, H); got {(b, h)} after {tuple(g['sum'].shape[:2])}")
        g["sum"], g["count"] = _grow(g["sum"], n_kv), _grow(g["count"], n_kv)
        lim = min(key_limit(ctx, q_start, c), probs.shape[-1])
        p = probs.detach().float()[..., :lim]
        if ctx.key_padding is not None:  # padded query rows may hold anything, even NaN: drop them
            real = query_valid(ctx, q_start, c, b).to(p.device)
            p = p.masked_fill(~real[:, None, :, None], 0.0)
        # a float32 sum over <= chunk rows is accurate to ~1e-7; the running total is float64
        g["sum"][..., :lim] += column_sums(p).cpu()
        g["count"][..., :n_kv] += visible_per_key(ctx, q_start, c, b)

    def alphas(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per sample group of ``layer``: (alpha (S, H, Nk) f64, seen (S, Nk) bool, first (S,) long).

        ``seen`` marks keys that at least one query could see; alpha is 0 elsewhere.
        """
        out = []
        for g in self._groups.get(layer, []):
            seen = g["count"] > 0
            alpha = g["sum"] / g["count"].clamp_min(1.0)[:, None, :]
            out.append((alpha, seen, g["first"]))
        return out

    def layers(self) -> list[int]:
        return sorted(self._groups)


def alphas_from_maps(
    attentions: Sequence[torch.Tensor], *, causal: bool, key_padding: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Reference: alpha (B, H, Nk) float64 per layer from full (B, H, N, N) self-attention maps.

    Written directly from the definition (no chunking, no shared code with the observer).
    """
    out = []
    for a in attentions:
        a = a.double()
        b, _, n, _ = a.shape
        allowed = torch.ones(b, n, n, dtype=torch.bool)
        if causal:
            allowed &= torch.ones(n, n).tril().bool()[None]
        if key_padding is not None:
            kp = key_padding.bool()
            allowed &= kp[:, None, :] & kp[:, :, None]
        a = torch.where(allowed[:, None], a, 0.0)  # padded rows may hold anything
        count = allowed.sum(dim=1).double()  # (B, Nk): queries that see key k
        out.append(a.sum(dim=2) / count.clamp_min(1)[:, None, :])
    return out
