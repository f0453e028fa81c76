"""Which query rows are real and which keys each one may see, for one chunk of one attention call.

Observers need this to normalise statistics by what a query *could* attend to (a causal query at
position i sees i + 1 keys) and to ignore padding. Everything here derives from the
:class:`~attnlab.probes.base.CallContext`, never from the probabilities, so a visible key that
received exactly 0 probability still counts.

Conventions (self-attention): key j sits at cache position j; query row i of the call sits at
``ctx.q_positions[i]``; a query row is real iff the key at its own position is real
(``ctx.key_padding[b, q_positions[i]]``); a causal query sees keys ``j <= q_positions[i]``.
"""
from __future__ import annotations

import torch

from .base import CallContext


def chunk_positions(ctx: CallContext, q_start: int, n_rows: int) -> torch.Tensor:
    """(C,) long: absolute positions of query rows ``q_start : q_start + n_rows``."""
    if q_start < 0 or q_start + n_rows > ctx.n_q:
        raise ValueError(f"query chunk out of range: {q_start=}, {n_rows=}, ctx.n_q={ctx.n_q}")
    return ctx.q_positions[q_start : q_start + n_rows].to(torch.long).cpu()


def query_valid(ctx: CallContext, q_start: int, n_rows: int, batch: int) -> torch.Tensor:
    """(B, C) bool: True for real (non-padding) query rows of the chunk."""
    pos = chunk_positions(ctx, q_start, n_rows)
    if ctx.key_padding is None:
        return torch.ones(batch, n_rows, dtype=torch.bool)
    return ctx.key_padding.to(torch.bool).cpu()[:, pos]


def visible_keys(ctx: CallContext, q_start: int, n_rows: int, batch: int) -> torch.Tensor:
    """(B, C, Nk) bool: key j is visible to query row i (both real, and j <= pos_i when causal)."""
    pos = chunk_positions(ctx, q_start, n_rows)
    vis = torch.ones(batch, n_rows, ctx.n_kv, dtype=torch.bool)
    if ctx.causal:
        vis &= (torch.arange(ctx.n_kv)[None, :] <= pos[:, None])[None]
    if ctx.key_padding is not None:
        kp = ctx.key_padding.to(torch.bool).cpu()
        vis &= kp[:, None, :]
        vis &= kp[:, pos][:, :, None]
    return vis


def first_real_key(key_padding: torch.Tensor | None, batch: int) -> torch.Tensor:
    """(B,) long: index of each sample's first real key (0 without padding); the 'first token'."""
    if key_padding is None:
        return torch.zeros(batch, dtype=torch.long)
    kp = key_padding.to(torch.bool).cpu()
    return kp.to(torch.int8).argmax(dim=1)


def visible_per_key(ctx: CallContext, q_start: int, n_rows: int, batch: int) -> torch.Tensor:
    """(B, Nk) float64: how many real query rows of the chunk see each key; = visible_keys(...).sum(1).

    Computed from positions, without the (B, C, Nk) mask.
    """
    pos = chunk_positions(ctx, q_start, n_rows)
    real = query_valid(ctx, q_start, n_rows, batch).double()
    if ctx.causal:  # queries at positions >= j see key j: a reversed cumulative histogram
        hist = torch.zeros(batch, ctx.n_kv, dtype=torch.float64).index_add_(1, pos, real)
        counts = hist.flip(1).cumsum(1).flip(1)
    else:
        counts = real.sum(1, keepdim=True).expand(batch, ctx.n_kv).clone()
    if ctx.key_padding is not None:
        counts *= ctx.key_padding.to(torch.bool).cpu()
    return counts


def visible_per_query(ctx: CallContext, q_start: int, n_rows: int, batch: int) -> torch.Tensor:
    """(B, C) long: how many keys each query row of the chunk sees (0 for padded rows); = visible_keys(...).sum(2)."""
    pos = chunk_positions(ctx, q_start, n_rows)
    real = query_valid(ctx, q_start, n_rows, batch)
    if ctx.key_padding is None:
        n = (pos + 1) if ctx.causal else torch.full_like(pos, ctx.n_kv)
        return n[None, :].expand(batch, -1) * real
    kp = ctx.key_padding.to(torch.bool).cpu().long()
    n = kp.cumsum(1)[:, pos] if ctx.causal else kp.sum(1, keepdim=True).expand(batch, n_rows)
    return n * real


def key_limit(ctx: CallContext, q_start: int, n_rows: int) -> int:
    """Keys at index >= this hold no probability for the chunk: max position + 1 when causal, else Nk.

    Observers reduce ``probs[..., :key_limit]`` only: under a causal mask that skips the zero
    upper triangle, about half of a prefill's work.
    """
    if not ctx.causal:
        return ctx.n_kv
    return min(ctx.n_kv, int(chunk_positions(ctx, q_start, n_rows).max()) + 1)
