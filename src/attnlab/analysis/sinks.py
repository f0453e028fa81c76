"""Attention sinks: how much attention the first token (and any other key) soaks up, per head.

Paper: "When Attention Sink Emerges in Language Models: An Empirical View" (Gu et al., ICLR 2025,
arXiv 2410.10781). Metric: alpha^{l,h}_k = mean attention key k receives from the queries that can
see it (see :mod:`.column_mass`); the sink ratio is the share of (sample, layer, head) whose
first-token alpha exceeds epsilon = 0.3.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .column_mass import ColumnMassObserver, alphas_from_maps

EPSILON = 0.3  # the paper's threshold on alpha_0 (sail-sg/Attention-Sink compute_attention_sink)


def _check(epsilon: float, top_k: int) -> None:
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"`epsilon` must be in (0, 1); got {epsilon=}")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"`top_k` must be an int >= 1; got {top_k=}")


def per_sample(groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Flatten sample groups into one (H, N_s) alpha per sample, starting at its first real key.

    Keys no query could see (padding) are NaN.
    """
    out = []
    for alpha, seen, first in groups:
        for s in range(alpha.shape[0]):
            a = alpha[s].clone()
            a[:, ~seen[s]] = float("nan")
            out.append(a[:, int(first[s]):])
    return out


def mean_profile(samples: list[torch.Tensor]) -> torch.Tensor:
    """(H, N_max) mean over samples of alpha at each position relative to the first token."""
    n = max(a.shape[1] for a in samples)
    h = samples[0].shape[0]
    total, count = torch.zeros(h, n, dtype=torch.float64), torch.zeros(h, n, dtype=torch.float64)
    for a in samples:
        ok = ~torch.isnan(a)
        total[:, : a.shape[1]] += torch.where(ok, a, 0.0)
        count[:, : a.shape[1]] += ok
    return total / count.clamp_min(1)


def summarize_sinks(
    per_layer: dict[int, list[torch.Tensor]], n_layers: int, *, epsilon: float = EPSILON, top_k: int = 3
) -> dict:
    """JSON summary from per-layer lists of per-sample alpha (H, N_s) (index 0 = first real token).

    Returns:
        ``{"epsilon", "n_samples", "sink_ratio", "per_layer": {"sink_ratio": [L]},
        "per_head": {"alpha_first": [L][H], "max_alpha_later": [L][H]}, "top_sinks": [L][H][k] of
        [position, alpha]}``; positions are relative to each sample's first real token and alpha of
        ``top_sinks`` is the mean over samples. Layers never observed are None.
        ``max_alpha_later``: the largest alpha over positions >= 1 (hidden-sink strength).
    """
    _check(epsilon, top_k)
    alpha_first, later, top, layer_ratio = [], [], [], []
    hits = total = 0
    n_samples = 0
    for layer in range(n_layers):
        samples = per_layer.get(layer)
        if not samples:
            alpha_first.append(None), later.append(None), top.append(None), layer_ratio.append(None)
            continue
        n_samples = len(samples)
        a0 = torch.stack([a[:, 0] for a in samples])  # (S, H)
        exceed = a0 > epsilon
        hits, total = hits + int(exceed.sum()), total + exceed.numel()
        layer_ratio.append(float(exceed.double().mean()))
        alpha_first.append(a0.mean(0).tolist())
        prof = mean_profile(samples)
        later.append(prof[:, 1:].max(dim=1).values.tolist() if prof.shape[1] > 1 else [0.0] * prof.shape[0])
        k = min(top_k, prof.shape[1])
        vals, idx = prof.topk(k, dim=1)
        top.append([[[int(i), float(v)] for i, v in zip(ri, rv)] for ri, rv in zip(idx, vals)])
    return {
        "epsilon": epsilon,
        "n_samples": n_samples,
        "sink_ratio": hits / total if total else None,
        "per_layer": {"sink_ratio": layer_ratio},
        "per_head": {"alpha_first": alpha_first, "max_alpha_later": later},
        "top_sinks": top,
    }


class SinkObserver(ColumnMassObserver):
    """Streaming attention-sink statistics; ``result()`` is :func:`summarize_sinks` of what it saw."""

    def __init__(self, epsilon: float = EPSILON, top_k: int = 3) -> None:
        _check(epsilon, top_k)
        self.epsilon, self.top_k = epsilon, top_k
        super().__init__()

    def result(self) -> dict:
        per_layer = {layer: per_sample(self.alphas(layer)) for layer in self.layers()}
        return summarize_sinks(per_layer, self.n_layers or 0, epsilon=self.epsilon, top_k=self.top_k)


def attention_sinks(
    attentions: Sequence[torch.Tensor],
    *,
    causal: bool,
    key_padding: torch.Tensor | None = None,
    epsilon: float = EPSILON,
    top_k: int = 3,
) -> dict:
    """The same summary as :class:`SinkObserver`, from full maps: one (B, H, N, N) per layer."""
    per_layer = {}
    for layer, alpha in enumerate(alphas_from_maps(attentions, causal=causal, key_padding=key_padding)):
        b = alpha.shape[0]
        first = torch.zeros(b, dtype=torch.long) if key_padding is None else key_padding.long().argmax(1)
        seen = torch.ones(b, alpha.shape[-1], dtype=torch.bool) if key_padding is None else key_padding.bool()
        per_layer[layer] = per_sample([(alpha, seen, first)])
    return summarize_sinks(per_layer, len(attentions), epsilon=epsilon, top_k=top_k)
