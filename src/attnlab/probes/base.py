"""The observer contract: what attnlab's attention call shows to a probe.

An attached model runs each attention layer through attnlab's one attention function
(registered in transformers' AttentionInterface, see ``attnlab.hf.attach``). When observers are
attached, that function computes the attention probabilities in query chunks of ``chunk`` rows,
exactly (float32 accumulate), and hands each chunk to every observer, which reduces it on the fly.
A full (Nq, Nk) map is never kept for all layers at once: memory stays O(chunk x Nk).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CallContext:
    """What an observer or modifier knows about one attention call.

    Attributes:
        layer: ``module.layer_idx`` of the attention module (0-based).
        n_layers: number of attention layers in the model.
        module: the attention nn.Module itself.
        n_q, n_kv: query and key lengths of this call (Nq, Nk).
        q_positions: (Nq,) long, the absolute position of each query (cache position); key j is at
            position j of the cache, so query row i may see key j iff j <= q_positions[i] for causal LMs.
        causal: whether the model masks the future.
        key_padding: (B, Nk) bool, True for real keys, or None when nothing is padded.
        scaling: the softmax scale the model uses.
        extra: call details that not every model passes, e.g. ``position_ids`` (B|1, Nq).
        input_ids: (B, Nq) token ids of the current forward call when the model got ``input_ids``
            (during cached decoding: only the new tokens), else None. Set by ``attnlab.attach``.
        chunk_logits, chunk_log_norm: set only while ``observe`` runs, and only on the exact path's
            plain causal case (else None): the chunk's logits (B, H, C, W) (the scores the softmax
            took; finite, a large negative floor where masked; W = probs.shape[-1]) and each row's
            log-sum-exp (B, H, C), so that log p = chunk_logits - chunk_log_norm[..., None] where
            p > 0. Read-only: they are the attention call's own buffers.
    """

    layer: int
    n_layers: int
    module: torch.nn.Module
    n_q: int
    n_kv: int
    q_positions: torch.Tensor
    causal: bool
    key_padding: torch.Tensor | None = None
    scaling: float = 1.0
    extra: dict = field(default_factory=dict)
    input_ids: torch.Tensor | None = None
    chunk_logits: torch.Tensor | None = None
    chunk_log_norm: torch.Tensor | None = None


class Observer:
    """Base class of probes. Override ``observe``; read results with ``result()``.

    ``observe`` receives probs (B, Hq, C, Nk) float32 for query rows ``q_start : q_start + C`` of
    one layer; rows sum to 1 over the keys each query may see (masked keys are exactly 0).
    ``layer_done`` is called once per layer call after its last chunk.

    ``narrow_ok = True`` (class attribute) lets the attention call skip widening: ``probs`` may then
    hold only the first ``probs.shape[-1] <= ctx.n_kv`` keys, all later keys being exactly 0 (read Nk
    from ``ctx.n_kv``, never from ``probs``), and promises to read ``probs`` (and ``ctx.chunk_*``)
    only during ``observe``: the attention call may reuse their memory for the next chunk.
    """

    narrow_ok: bool = False

    def observe(self, ctx: CallContext, q_start: int, probs: torch.Tensor) -> None:  # pragma: no cover
        raise NotImplementedError

    def layer_done(self, ctx: CallContext) -> None:
        pass

    def reset(self) -> None:
        pass

    def result(self) -> dict:
        """Plain-JSON-able numbers. Per-head metrics are nested lists shaped [n_layers][n_heads]."""
        return {}
