"""The exact chunked fallback: attention over query chunks, memory O(chunk x Nk).

Each chunk of queries computes its full score rows against all keys in float32 (float64 for
float64 inputs), applies the score_mod and the pattern's mask, and takes an ordinary softmax: a
two-pass softmax over one complete row, so the result is exact, not approximated. With a pattern,
each chunk only visits the key blocks its analytic block layout marks visible (a slice when they are
contiguous, a gather otherwise), so local patterns cost O(Nq x window), not O(Nq x Nk). It runs every
dtype, head dim, pattern and score_mod on every device, and it is what attnlab falls back to when
FlexAttention cannot run a call. It is also the only kernel that returns the log-sum-exp cheaply
on every device (``chunked_attention(..., return_lse=True)``).
"""
from __future__ import annotations

from typing import Callable

import torch

# Query rows per chunk: the score chunk is (B, Hq, CHUNK, Nk) float32.
CHUNK = 256


# Key block of the skip map: small enough to follow a window's edge, large enough to gather cheaply.
KV_BLOCK = 64


def _index_grids(b: int, h: int, q0: int, q1: int, device) -> tuple[torch.Tensor, ...]:
    """Broadcastable (B,1,1,1), (1,H,1,1), (1,1,C,1) int64 index tensors for one chunk."""
    return (
        torch.arange(b, device=device).view(-1, 1, 1, 1),
        torch.arange(h, device=device).view(1, -1, 1, 1),
        torch.arange(q0, q1, device=device).view(1, 1, -1, 1),
    )


def _visible_keys(layout, i: int, n_kv: int, device) -> slice | torch.Tensor:
    """Keys of query chunk ``i`` that its block layout marks visible: a slice, or an index tensor."""
    blocks = (layout.full[i] | layout.partial[i]).nonzero().flatten().tolist()
    if not blocks:
        return slice(0, 0)
    first, last = blocks[0], blocks[-1]
    if last - first + 1 == len(blocks):
        return slice(first * layout.kv_block, min((last + 1) * layout.kv_block, n_kv))
    starts = torch.tensor(blocks, device=device) * layout.kv_block
    idx = (starts[:, None] + torch.arange(layout.kv_block, device=device)).flatten()
    return idx[idx < n_kv]


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pattern=None,
    scale: float,
    score_mod: Callable | None = None,
    chunk: int = CHUNK,
    return_lse: bool = False,
):
    """softmax(q k^T * scale + score_mod, masked by pattern) v, chunk query rows at a time.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D). v: (B, Hkv, Nk, Dv); Hq % Hkv == 0 (query head h
            uses key/value head h // (Hq // Hkv)). Inputs are assumed checked by the caller.
        pattern: an attnlab Pattern or None (every key visible).
        scale: multiplier of q k^T.
        score_mod: FlexAttention-style ``f(score, b, h, q_idx, kv_idx) -> score`` on broadcastable
            index tensors, applied to the scaled scores before masking.
        chunk: query rows per step; peak extra memory is about B * Hq * chunk * Nk floats.
        return_lse: also return the natural-log log-sum-exp of each row's (masked) scores.

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype; with ``return_lse`` also lse (B, Hq, Nq) float32
        (float64 for float64 inputs). Fully masked rows give out = 0 and lse = -inf.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf, vf = k.to(acc), v.to(acc)
    out = torch.empty(B, Hq, Nq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Nq, dtype=acc, device=q.device) if return_lse else None
    mask_fn = pattern.mask_mod(Nq, Nk, q.device) if pattern is not None else None
    layout = pattern.block_layout(Nq, Nk, chunk, KV_BLOCK) if pattern is not None else None
    for i, q0 in enumerate(range(0, Nq, chunk)):
        q1 = min(q0 + chunk, Nq)
        keys = _visible_keys(layout, i, Nk, q.device) if layout is not None else slice(0, Nk)
        if isinstance(keys, slice):
            k_idx = torch.arange(keys.start, keys.stop, device=q.device)
        else:
            k_idx = keys
        kc, vc, W = kf[:, :, keys], vf[:, :, keys], k_idx.numel()
        if W == 0:  # nothing visible to the whole chunk
            out[:, :, q0:q1] = 0
            if lse is not None:
                lse[:, :, q0:q1] = float("-inf")
            continue
        qc = q[:, :, q0:q1].to(acc).reshape(B, Hkv, G * (q1 - q0), D)  # GQA: a group's queries share k
        s = (qc @ kc.transpose(-1, -2)).view(B, Hq, q1 - q0, W) * scale
        bi, hi, qi = _index_grids(B, Hq, q0, q1, q.device)
        ki = k_idx.view(1, 1, 1, -1)
        if score_mod is not None:
            s = score_mod(s, bi, hi, qi, ki).to(acc).expand(B, Hq, q1 - q0, W)
        if mask_fn is not None:
            s = s.masked_fill(~mask_fn(bi, hi, qi, ki), float("-inf"))
        row_max = s.amax(-1, keepdim=True)
        empty = row_max == float("-inf")
        p = torch.exp(s - row_max.masked_fill(empty, 0.0))
        denom = p.sum(-1, keepdim=True)
        o = (p.view(B, Hkv, G * (q1 - q0), W) @ vc).view(B, Hq, q1 - q0, Dv)
        out[:, :, q0:q1] = (o / denom.clamp_min(torch.finfo(acc).tiny)).masked_fill(empty, 0.0).to(q.dtype)
        if lse is not None:
            lse[:, :, q0:q1] = (row_max + denom.log()).squeeze(-1)
    return (out, lse) if return_lse else out
