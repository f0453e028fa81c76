"""Sink-surplus redistribution as a per-row logit bias, shared by ACT and VAR.

Both methods scale the attention on a set S of sink keys by ``beta`` in chosen (head, query) rows and
give the removed mass (1 - beta) * A[i, S] to the other keys in proportion to their attention:
A'[i, S] = beta A[i, S] and A'[i, j] = A[i, j] (1 - beta m_i) / (1 - m_i) for j not in S, m_i = sum_S A[i, S].
That is exactly softmax with a bias b_i on the columns of S, exp(b_i) = beta (1 - m_i) / (1 - beta m_i), so
it runs as a rank-one :meth:`Modifier.score_bias` on the fused causal SDPA kernel. Computing m_i needs the chosen heads'
probabilities: :func:`head_probs` recomputes them, for those heads only.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..probes.base import CallContext
from .base import RankOneBias


def visible_keys(ctx: CallContext, device: torch.device) -> torch.Tensor:
    """bool (B|1, 1, Nq, Nk): True where query i may see key j (causal rule and key padding)."""
    if ctx.causal:
        vis = torch.arange(ctx.n_kv, device=device)[None, :] <= ctx.q_positions.to(device)[:, None]
    else:
        vis = torch.ones(ctx.n_q, ctx.n_kv, dtype=torch.bool, device=device)
    vis = vis[None, None]
    if ctx.key_padding is not None:
        vis = vis & ctx.key_padding.to(device)[:, None, None, :]
    return vis


def head_probs(ctx: CallContext, heads: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs (B, Hs, Nq, Nk) float32, visible (B|1, 1, Nq, Nk) bool) of the query heads ``heads`` of this call.

    Reads ``ctx.extra["query"]`` (B, Hq, Nq, D) and ``ctx.extra["key"]`` (B, Hkv, Nk, D) (set during
    ``score_bias``); query head h reads kv head h // (Hq / Hkv). Rows with no visible key are 0.
    """
    query, key = ctx.extra["query"], ctx.extra["key"]
    group = query.shape[1] // key.shape[1]
    q = query[:, list(heads)].float()  # (B, Hs, Nq, D)
    k = key[:, [h // group for h in heads]].float()  # (B, Hs, Nk, D)
    vis = visible_keys(ctx, query.device)
    scores = (q @ k.transpose(-1, -2)).mul_(ctx.scaling).masked_fill_(~vis, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num_(nan=0.0), vis


def sink_mass(ctx: CallContext, heads: Sequence[int], sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m (B, Hs, Nq) float32, visible (B|1, 1, Nq, Nk)): each row's attention on the keys ``sinks`` (B, Nk) bool.

    m_i = sum_j A[i, j] [j in S] is attention with the values replaced by the indicator of S, so one fused
    SDPA call gives it without the (Nq, Nk) probabilities (what :func:`head_probs` builds). Rows with no
    visible key get 0. Reads ``ctx.extra["query"]`` / ``ctx.extra["key"]`` like :func:`head_probs`.
    """
    query, key = ctx.extra["query"], ctx.extra["key"]
    group = query.shape[1] // key.shape[1]
    q = query[:, list(heads)]  # (B, Hs, Nq, D)
    k = key[:, [h // group for h in heads]]  # (B, Hs, Nk, D)
    vis = visible_keys(ctx, query.device)
    # the fused CPU kernel wants v as wide as q: the indicator is column 0, the rest zeros
    v = sinks.to(q.dtype)[:, None, :, None].expand(-1, len(heads), -1, 1)
    v = torch.cat([v, v.new_zeros(*v.shape[:3], q.shape[-1] - 1)], -1).expand(q.shape[0], -1, -1, -1)
    plain_causal = ctx.causal and ctx.key_padding is None and ctx.n_q == ctx.n_kv
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=None if plain_causal else vis, is_causal=plain_causal and ctx.n_q > 1, scale=ctx.scaling)
    return out[..., 0].float().nan_to_num_(nan=0.0).mul_(vis.any(-1)), vis


def row_log_factor(sink_mass: torch.Tensor, beta: float, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Hs, Nq) bias b_i for the sink columns so that they keep ``beta`` times their mass m_i (module doc).

    Rows with no sink mass, or only sink mass (nothing to give it to), or outside ``rows``, get 0.
    """
    m = sink_mass.double().clamp(0.0, 1.0)
    ok = (m > 0) & (m < 1.0 - 1e-6)
    if rows is not None:
        ok &= rows
    b = torch.log(torch.tensor(beta, dtype=torch.float64)) + torch.log1p(-m) - torch.log1p(-beta * m)
    return torch.where(ok, b, torch.zeros_like(b)).float()


def scatter_bias(n_heads: int, heads: Sequence[int], sinks: torch.Tensor, factor: torch.Tensor) -> RankOneBias:
    """The bias ``factor`` (B, Hs, Nq) on the ``sinks`` (B, Hs, Nk) columns of ``heads``, 0 elsewhere.

    Rank one per head (row factor times column indicator), so it runs as one extra q/k dimension.
    """
    b, _, n_q = factor.shape
    row = factor.new_zeros(b, n_heads, n_q, 1)
    col = factor.new_zeros(b, n_heads, 1, sinks.shape[-1])
    row[:, list(heads), :, 0] = factor
    col[:, list(heads), 0, :] = sinks.to(factor.dtype)
    return RankOneBias(row, col)


class Handle:
    """An attachment plus forward hooks of the model; ``detach()`` removes both. A context manager.

    Attribute access falls through to the attachment (``handle.model``, ``handle.modifiers``, ...).
    """

    def __init__(self, attachment, hooks: list) -> None:
        self.attachment, self.hooks = attachment, hooks
        self.info: dict = {}

    def detach(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.attachment.detach()

    def __getattr__(self, name):
        return getattr(self.__dict__["attachment"], name)

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()
