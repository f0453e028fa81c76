"""Compiled FlexAttention for any pattern and score_mod, on CPU and CUDA.

Three caches keep it fast after the first call:

- one ``torch.compile(flex_attention)`` per process (compiling costs seconds on CPU);
- the mask_mod closure per (pattern, Nq, Nk, device): dynamo guards on the closure object, so a
  fresh closure per call would recompile every call; equal patterns hash equal and share one;
- the BlockMask per (pattern, Nq, Nk, device, block size), built from the pattern's analytic
  ``block_layout`` with ``BlockMask.from_kv_blocks`` (full blocks run without the mask, partial
  ones evaluate it), never from an N x N evaluation of the mask.

Multi-dimensional patterns that give a ``token_order`` run in that tile order (GNA-style token
permutation, from "Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the
Speed of Light") when it makes the block mask sparser, so that block density approaches element
density; the output is put back in the caller's order.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128  # FlexAttention's default tile; its CPU and GPU templates are tuned for it.
# Each pattern (its mask_mod's constants) compiles its own kernel. Past dynamo's recompile limit
# (8 by default) flex_attention silently runs unfused, materialising (B, H, Nq, Nk) scores: 50x
# slower and 13 GB at N=8192 on an H200, seen in the kernel benchmark. attnlab raises the limit.
RECOMPILE_LIMIT = 256


@functools.lru_cache(maxsize=1)
def compiled_flex() -> Callable:
    """The process-wide compiled flex_attention (compiled lazily on first call)."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # the newer and the older name
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))
    if hasattr(dynamo_config, "accumulated_recompile_limit"):
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    return torch.compile(flex_attention)


@functools.lru_cache(maxsize=32)
def cached_mask_mod(pattern, n_q: int, n_kv: int, device: torch.device) -> Callable:
    """One mask_mod closure per (pattern, Nq, Nk, device), so compiled code is reused, not rebuilt."""
    return pattern.mask_mod(n_q, n_kv, device)


def _pack(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nQb, nKb) bool -> counts (1, 1, nQb) int32 and indices (1, 1, nQb, nKb) int32, selected first."""
    counts = sel.sum(-1, dtype=torch.int32)
    # A stable sort of ~sel puts the selected key blocks first, in increasing order.
    order = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return counts[None, None], order[None, None]


@functools.lru_cache(maxsize=16)
def block_mask(pattern, n_q: int, n_kv: int, device: torch.device, block: int = BLOCK) -> BlockMask:
    """The pattern's BlockMask from its analytic block layout (full and partial tiles)."""
    layout = pattern.block_layout(n_q, n_kv, block, block)
    partial_n, partial_i = _pack(layout.partial.to(device))
    full_n, full_i = _pack(layout.full.to(device))
    return BlockMask.from_kv_blocks(
        partial_n,
        partial_i,
        full_n,
        full_i,
        BLOCK_SIZE=block,
        mask_mod=cached_mask_mod(pattern, n_q, n_kv, device),
        seq_lengths=(n_q, n_kv),
    )


@functools.lru_cache(maxsize=32)
def token_order(pattern, n_q: int, n_kv: int, device: torch.device, block: int = BLOCK) -> torch.Tensor | None:
    """The pattern's tile order if it makes the block mask sparser than row-major order, else None.

    Tile order is not always better: a 64 x 64 grid with kernel 9 touches fewer 128-token blocks in
    row-major order (2 rows per block) than in 8 x 16 tiles; 128 x 128 with kernel 33 is the reverse.
    """
    order = pattern.token_order(n_q, n_kv)
    if order is None:
        return None
    tiled = pattern.permuted().block_layout(n_q, n_kv, block, block).density
    plain = pattern.block_layout(n_q, n_kv, block, block).density
    return order.to(device) if tiled < plain else None


def prepare(pattern, n_q: int, n_kv: int, device: torch.device) -> tuple[torch.Tensor | None, BlockMask | None]:
    """(token order or None, BlockMask or None) for a call; raises the pattern's ValueErrors (cached)."""
    if pattern is None:
        return None, None
    order = token_order(pattern, n_q, n_kv, device)
    return order, block_mask(pattern.permuted() if order is not None else pattern, n_q, n_kv, device)


@functools.lru_cache(maxsize=32)
def _in_caller_order(score_mod: Callable, order: torch.Tensor) -> Callable:
    """score_mod seeing the caller's token positions while the kernel runs in tile order."""
    return lambda score, b, h, q_idx, kv_idx: score_mod(score, b, h, order[q_idx], order[kv_idx])


def flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern,
    scale: float,
    score_mod: Callable | None = None,
    compiled: bool = True,
) -> torch.Tensor:
    """FlexAttention with the pattern's BlockMask.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D). v: (B, Hkv, Nk, Dv).
        pattern: an attnlab Pattern or None (dense, with score_mod).
        scale: multiplier of q k^T.
        score_mod: ``f(score, b, h, q_idx, kv_idx) -> score``; it always sees positions in the
            caller's token order, also when the kernel runs in tile order.
        compiled: False runs eager flex_attention (slow, materialises scores; for debugging).

    Returns:
        (B, Hq, Nq, Dv) in q's dtype; rows that see no key are zeros.
    """
    n_q, n_kv = q.shape[2], k.shape[2]
    order, bm = prepare(pattern, n_q, n_kv, q.device)
    if order is not None:
        q, k, v = q[:, :, order], k[:, :, order], v[:, :, order]  # (B, H, N, D) in tile order
        if score_mod is not None:
            score_mod = _in_caller_order(score_mod, order)
    fn = compiled_flex() if compiled else flex_attention
    out = fn(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if order is not None:
        restored = torch.empty_like(out)
        restored[:, :, order] = out  # undo the tile order without building the inverse
        out = restored
    return out
