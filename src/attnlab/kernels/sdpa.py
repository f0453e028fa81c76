"""PyTorch's scaled_dot_product_attention for dense, causal and small masked calls.

Dense and causal self-attention go straight to SDPA with no extra copies (GQA through
``enable_gqa``), so attnlab costs what SDPA costs. Causal cross attention uses a lower-right causal
bias (FlashAttention's bottom-right alignment). Any other pattern can run here as a dense boolean
(Nq, Nk) mask: O(Nq * Nk) memory, so attnlab's dispatch uses it only for small calls.

SDPA's handling of rows with no visible key differs by backend (zeros or NaN); here such rows are
always set to zeros, the attnlab contract.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def _gqa(q: torch.Tensor, k: torch.Tensor) -> bool:
    return q.shape[1] != k.shape[1]


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Noncausal self/cross attention. q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=_gqa(q, k))


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention, bottom-right aligned: query i sees keys j <= i + (Nk - Nq).

    Shapes as in ``dense``. With Nq > Nk the first Nq - Nk queries see no key and return zeros.
    """
    n_q, n_kv = q.shape[2], k.shape[2]
    if n_q == n_kv:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=True, enable_gqa=_gqa(q, k))
    if n_q > n_kv:  # the last Nk queries form a square causal problem; the others see no key
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        out[:, :, n_q - n_kv :] = causal(q[:, :, n_q - n_kv :], k, v, scale)
        return out
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=causal_lower_right(n_q, n_kv), scale=scale, enable_gqa=_gqa(q, k)
    )


@functools.lru_cache(maxsize=4)
def dense_mask(pattern, n_q: int, n_kv: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pattern's (Nq, Nk) bool mask and, if some query sees no key, the (Nq, 1) bool of those rows."""
    mask = pattern.mask(n_q, n_kv, device=device)
    empty = ~mask.any(-1, keepdim=True)
    return mask, (empty if bool(empty.any()) else None)


def masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern, scale: float) -> torch.Tensor:
    """Any pattern as a dense boolean mask (memory O(Nq * Nk)). Shapes as in ``dense``."""
    mask, empty = dense_mask(pattern, q.shape[2], k.shape[2], q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=_gqa(q, k))
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return out
