"""Prefill attention scores that score-based policies rank prompt keys by, recomputed cheaply.

No N x N map is kept: ``window_scores`` recomputes only the last ``window`` queries (SnapKV's
observation window), ``accumulated_scores`` walks the queries in chunks (H2O's accumulated
attention, O(chunk x N) memory). Both sum the probabilities over the queries and over the query
heads of each KV head's GQA group, in float32.
"""
from __future__ import annotations

import torch

WINDOW = 32  # SnapKV's observation window (its reference default); a recording scores with it too


def _group_sum(p: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(B, H, C, T) probabilities -> (B, H_kv, T) summed over the C queries and each GQA group."""
    B, H, _, T = p.shape
    return p.sum(2).view(B, n_kv, H // n_kv, T).sum(2)


def _probs(q: torch.Tensor, k: torch.Tensor, scaling: float, q_pos: torch.Tensor,
           valid: torch.Tensor | None) -> torch.Tensor:
    """(B, H, C, T) float32 causal softmax of queries at positions q_pos (C,) over all T keys."""
    B, H, C, D = q.shape
    n_kv, T = k.shape[1], k.shape[2]
    qg = q.float().view(B, n_kv, H // n_kv, C, D)
    logits = torch.einsum("bgrcd,bgtd->bgrct", qg, k.float()).reshape(B, H, C, T) * scaling
    allowed = torch.arange(T, device=q.device).view(1, T) <= q_pos.view(C, 1)  # (C, T) causal
    allowed = allowed.view(1, 1, C, T)
    if valid is not None:
        allowed = allowed & valid.view(B, 1, 1, T)
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def window_scores(query: torch.Tensor, key: torch.Tensor, scaling: float, window: int,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H_kv, T) attention the last ``window`` prompt queries pay to each key.

    Args:
        query: (B, H, T, D) post-RoPE prompt queries; key: (B, H_kv, T, D).
        valid: (B, T) bool, False at padding keys (never scored).
    """
    T = query.shape[2]
    w = max(1, min(window, T))
    q_pos = torch.arange(T - w, T, device=query.device)
    return _group_sum(_probs(query[:, :, T - w:], key, scaling, q_pos, valid), key.shape[1])


def accumulated_scores(query: torch.Tensor, key: torch.Tensor, scaling: float,
                       valid: torch.Tensor | None = None, chunk: int = 512) -> torch.Tensor:
    """(B, H_kv, T) attention each key receives summed over every prompt query (H2O's statistic).

    Padding queries are skipped (their rows would otherwise add mass).
    """
    B, H, T, _ = query.shape
    total = torch.zeros(B, key.shape[1], T, dtype=torch.float32, device=query.device)
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        q_pos = torch.arange(s, e, device=query.device)
        p = _probs(query[:, :, s:e], key[:, :, :e], scaling, q_pos, None if valid is None else valid[:, :e])
        if valid is not None:
            p = p * valid[:, s:e].view(B, 1, e - s, 1)
        total[:, :, :e] += _group_sum(p, key.shape[1])
    return total
