"""The exact float64 attention that every kernel and mechanism in attnlab is tested against.

It materialises the full (B, Hq, Nq, Nk) score tensor: use it on small inputs only.
"""
from __future__ import annotations

from typing import Callable

import torch

from .checks import check_qkv, default_scale

ScoreMod = Callable[..., torch.Tensor]


def index_grids(b: int, h: int, n_q: int, n_kv: int, device) -> tuple[torch.Tensor, ...]:
    """Broadcastable (B,1,1,1), (1,H,1,1), (1,1,Nq,1), (1,1,1,Nk) index tensors for mask/score mods."""
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    return (ar(b).view(-1, 1, 1, 1), ar(h).view(1, -1, 1, 1), ar(n_q).view(1, 1, -1, 1), ar(n_kv).view(1, 1, 1, -1))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pattern=None,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    score_mod: ScoreMod | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + score_mod) v in float64.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D). v: (B, Hkv, Nk, Dv). Hq % Hkv == 0 (GQA: query head h
            uses key/value head h // (Hq // Hkv)).
        pattern: an attnlab Pattern; its boolean mask (Nq, Nk) says which keys each query may see.
        mask: a boolean mask broadcastable to (B, Hq, Nq, Nk), True = may attend (ANDed with pattern).
        scale: multiplier of q k^T; default 1/sqrt(D).
        score_mod: FlexAttention-style `f(score, b, h, q_idx, kv_idx) -> score`, applied to the scaled
            scores before masking; it is called once on broadcastable index tensors.

    Returns:
        (B, Hq, Nq, Dv) float64. Rows whose every key is masked are zeros (not NaN).
    """
    check_qkv(q, k, v)
    scale = default_scale(q, scale)
    B, Hq, Nq, _ = q.shape
    groups = Hq // k.shape[1]
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    Nk = k.shape[2]
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if score_mod is not None:
        scores = score_mod(scores, *index_grids(B, Hq, Nq, Nk, q.device)).to(torch.float64)
        scores = scores.expand(B, Hq, Nq, Nk)
    allowed = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device)
    if pattern is not None:
        allowed = pattern.mask(Nq, Nk, device=q.device)
    allowed = allowed.expand(B, Hq, Nq, Nk)
    if mask is not None:
        allowed = allowed & mask.to(q.device, torch.bool)
    scores = scores.masked_fill(~allowed, float("-inf"))
    empty = ~allowed.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(~allowed, 0.0)
    return probs @ v
