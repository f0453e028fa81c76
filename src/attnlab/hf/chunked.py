"""The exact chunked attention that attnlab runs when observers or score/prob modifiers are attached.

Queries are processed ``chunk`` rows at a time, so one layer never holds more than a
(B, H, chunk, T_kv) float32 score block: memory is O(chunk x T_kv), whatever T_q is.
For each chunk: scores = q k^T * scaling (+ bias, softcap) -> ``modify_scores`` -> mask ->
softmax (fully masked rows -> 0) -> ``modify_probs`` -> every ``observe`` -> probs @ v.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..interventions.base import Modifier
from ..probes.base import CallContext, Observer


def chunked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ctx: CallContext,
    *,
    allowed: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scaling: float,
    softcap: float | None = None,
    dropout: float = 0.0,
    observers: Sequence[Observer] = (),
    modifiers: Sequence[Modifier] = (),
    chunk: int = 256,
) -> torch.Tensor:
    """Exact attention in float32, query chunk by query chunk, showing each chunk to observers.

    Args:
        query: (B, H, T_q, D). key: (B, H_kv, T_kv, D). value: (B, H_kv, T_kv, D_v); H % H_kv == 0 and
            query head h reads kv head h // (H / H_kv), as transformers' ``repeat_kv`` does.
        ctx: the call's context, handed to observers and modifiers.
        allowed: bool, broadcastable to (B, H, T_q, T_kv), True where a query may see a key; None: all.
        bias: float additive logit bias broadcastable to (B, H, T_q, T_kv), or None.
        scaling: multiplies q k^T. softcap: if set, scores = softcap * tanh(scores / softcap).
        dropout: dropout on the probabilities used for the output (observers see them undropped).

    Returns:
        (B, H, T_q, D_v) float32, before ``modify_output`` (the caller applies it).
    """
    b, h, n_q, d = query.shape
    h_kv, n_kv, d_v = key.shape[1], key.shape[2], value.shape[-1]
    groups = h // h_kv
    # Group query heads per kv head so that K and V are broadcast, never copied: (B, H_kv, G, T, D).
    q = query.float().reshape(b, h_kv, groups, n_q, d)
    k_t = key.float().transpose(-1, -2).unsqueeze(2)  # (B, H_kv, 1, D, T_kv)
    v = value.float().unsqueeze(2)  # (B, H_kv, 1, T_kv, D_v)
    out = torch.empty(b, h, n_q, d_v, dtype=torch.float32, device=query.device)
    for q0 in range(0, n_q, chunk):
        q1 = min(q0 + chunk, n_q)
        scores = (q[:, :, :, q0:q1] @ k_t).reshape(b, h, q1 - q0, n_kv) * scaling  # (B, H, C, T_kv)
        if bias is not None:
            scores = scores + _rows(bias, q0, q1).float()
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        for m in modifiers:
            scores = m.modify_scores(ctx, q0, scores)
        if allowed is not None:
            # Masking after modify_scores: a modifier can never make a masked key visible.
            scores = scores.masked_fill(~_rows(allowed, q0, q1), float("-inf"))
        # A row with no visible key is all -inf: softmax gives NaN there, and attnlab defines it as 0.
        probs = torch.softmax(scores, dim=-1).nan_to_num_(nan=0.0)
        for m in modifiers:
            probs = m.modify_probs(ctx, q0, probs)
        for o in observers:
            o.observe(ctx, q0, probs)
        if dropout > 0.0:
            probs = torch.nn.functional.dropout(probs, p=dropout)
        out_chunk = probs.reshape(b, h_kv, groups, q1 - q0, n_kv) @ v  # (B, H_kv, G, C, D_v)
        out[:, :, q0:q1] = out_chunk.reshape(b, h, q1 - q0, d_v)
    return out


def _rows(t: torch.Tensor, q0: int, q1: int) -> torch.Tensor:
    """Query rows q0:q1 of a (..., T_q or 1, T_kv) tensor, keeping a broadcast row dim as is."""
    return t if t.shape[-2] == 1 else t[..., q0:q1, :]
