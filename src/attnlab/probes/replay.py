"""Feed full attention maps (e.g. transformers' ``output_attentions=True``) to observers, chunk by chunk.

This is the slow, memory-hungry path that :func:`attnlab.attach` avoids; it exists so that a map
computed any other way (eager attention, a saved tensor) can be reduced by the same observers, and
so that tests can check streaming statistics against maps computed independently.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import CallContext, Observer


def replay_maps(
    observers: Sequence[Observer],
    attentions: Sequence[torch.Tensor],
    *,
    causal: bool,
    key_padding: torch.Tensor | None = None,
    chunk: int = 256,
    q_positions: torch.Tensor | None = None,
) -> None:
    """Stream per-layer maps through ``observers`` as the attached attention call would.

    Args:
        observers: probes to feed; each gets ``observe(ctx, q_start, probs)`` then ``layer_done``.
        attentions: one (B, H, Nq, Nk) map per layer, in layer order.
        causal: whether the model masks the future.
        key_padding: (B, Nk) bool, True for real keys; None when nothing is padded.
        chunk: query rows per chunk.
        q_positions: (Nq,) absolute query positions; default ``arange(Nk - Nq, Nk)``.
    """
    if chunk < 1:
        raise ValueError(f"`chunk` must be >= 1; got {chunk=}")
    if len(attentions) == 0:
        raise ValueError("`attentions` must hold at least one layer's map; got an empty sequence")
    n_layers = len(attentions)
    for layer, probs in enumerate(attentions):
        if probs.dim() != 4:
            raise ValueError(f"each map must be (B, H, Nq, Nk); got attentions[{layer}].shape={tuple(probs.shape)}")
        b, _, n_q, n_kv = probs.shape
        if key_padding is not None and tuple(key_padding.shape) != (b, n_kv):
            raise ValueError(f"`key_padding` must be (B, Nk)=({b}, {n_kv}); got {tuple(key_padding.shape)=}")
        pos = q_positions if q_positions is not None else torch.arange(n_kv - n_q, n_kv)
        ctx = CallContext(
            layer=layer, n_layers=n_layers, module=None, n_q=n_q, n_kv=n_kv,
            q_positions=pos, causal=causal, key_padding=key_padding,
        )
        for start in range(0, n_q, chunk):
            part = probs[:, :, start : start + chunk].to(torch.float32)
            for obs in observers:
                obs.observe(ctx, start, part)
        for obs in observers:
            obs.layer_done(ctx)
