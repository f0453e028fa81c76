"""Hidden attention sinks: later tokens (not the first) that soak up outsized attention.

Paper: "Unveiling and Harnessing Hidden Attention Sinks: Training-Free Attention Calibration for
Enhancing LLMs" (ACT; Yu et al., ICML 2024, arXiv 2406.15765). A key k at position >= 1 (relative to
the first real token) is a sink of head (l, h) when its normalised column mass
alpha_k = sum_i A[i, k] / (#queries that can see k) exceeds 0.1, the absolute threshold of the ACT
code (GATECH-EIC/ACT). ACT drops the first detected index (the initial sink); here position 0 is
excluded explicitly.

Deviation, documented: the last keys of a causal sequence are seen by very few queries (the last
one only by itself), so their alpha is a single probability and often exceeds 0.1 without being a
sink. Keys seen by fewer than ``min_queries`` queries are not considered; the default (None) is
max(8, N // 16) for a sample of N real tokens (8 at 128 tokens, 64 at 1,024). Pass
``min_queries=1`` for the ACT rule as written.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .column_mass import ColumnMassObserver, alphas_from_maps

THRESHOLD = 0.1  # ACT's THRES on the normalised column mass
MIN_QUERIES = None  # see module doc: max(8, N // 16); keys seen by fewer queries are too noisy to call sinks


def _check(threshold: float, min_queries: int) -> None:
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"`threshold` must be in (0, 1); got {threshold=}")
    if min_queries is not None and (not isinstance(min_queries, int) or min_queries < 1):
        raise ValueError(f"`min_queries` must be None or an int >= 1; got {min_queries=}")


def min_queries_for(n_tokens: int, min_queries: int | None) -> int:
    """The visibility cut for a sample of ``n_tokens`` real tokens (see module doc)."""
    return max(8, n_tokens // 16) if min_queries is None else min_queries


def summarize_hidden_sinks(
    per_layer: dict[int, list[tuple[torch.Tensor, torch.Tensor]]],
    n_layers: int,
    *,
    threshold: float = THRESHOLD,
    min_queries: int | None = MIN_QUERIES,
) -> dict:
    """JSON summary from per-layer lists of per-sample (alpha (H, N_s), count (N_s)), index 0 = first token.

    ``count`` is the number of queries that could see each key.

    Returns:
        ``{"threshold", "min_queries", "per_head": {"n_hidden_sinks": [L][H]} (mean over samples),
        "tokens": [{"sample", "position", "n_heads", "n_layers", "layers", "max_alpha"}, ...]}``,
        tokens sorted by ``n_heads`` (how many (layer, head) pairs treat it as a sink), then position.
    """
    _check(threshold, min_queries)
    n_sinks = []
    found: dict[tuple[int, int], dict] = {}
    for layer in range(n_layers):
        samples = per_layer.get(layer)
        if not samples:
            n_sinks.append(None)
            continue
        per_head = torch.zeros(samples[0][0].shape[0], dtype=torch.float64)
        for s, (alpha, count) in enumerate(samples):
            cut = min_queries_for(int((count > 0).sum()), min_queries)
            hit = (alpha > threshold) & (count >= cut)[None, :]
            hit[:, 0] = False  # the first token is the ordinary sink, see module doc
            per_head += hit.sum(dim=1)
            for pos in hit.any(dim=0).nonzero().flatten().tolist():
                e = found.setdefault((s, pos), {"sample": s, "position": pos, "n_heads": 0, "layers": [], "max_alpha": 0.0})
                e["n_heads"] += int(hit[:, pos].sum())
                e["layers"].append(layer)
                e["max_alpha"] = max(e["max_alpha"], float(alpha[hit[:, pos], pos].max()))
        n_sinks.append((per_head / len(samples)).tolist())
    tokens = sorted(found.values(), key=lambda e: (-e["n_heads"], e["sample"], e["position"]))
    for e in tokens:
        e["n_layers"] = len(e["layers"])
    return {"threshold": threshold, "min_queries": min_queries, "per_head": {"n_hidden_sinks": n_sinks}, "tokens": tokens}


def _per_sample(groups) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for alpha, count, first in groups:
        for s in range(alpha.shape[0]):
            f = int(first[s])
            out.append((alpha[s, :, f:], count[s, f:]))
    return out


class HiddenSinkObserver(ColumnMassObserver):
    """Streaming hidden-sink detection; ``result()`` is :func:`summarize_hidden_sinks` of what it saw."""

    def __init__(self, threshold: float = THRESHOLD, min_queries: int | None = MIN_QUERIES) -> None:
        _check(threshold, min_queries)
        self.threshold, self.min_queries = threshold, min_queries
        super().__init__()

    def result(self) -> dict:
        return hidden_sinks_of(self, threshold=self.threshold, min_queries=self.min_queries)


def hidden_sinks_of(obs: ColumnMassObserver, *, threshold: float = THRESHOLD, min_queries: int | None = MIN_QUERIES) -> dict:
    """:func:`summarize_hidden_sinks` of any column-mass observer (e.g. a SinkObserver: one pass, both results)."""
    per_layer = {}
    for layer in obs.layers():
        groups = [(a, g["count"], first) for (a, _, first), g in zip(obs.alphas(layer), obs._groups[layer])]
        per_layer[layer] = _per_sample(groups)
    return summarize_hidden_sinks(per_layer, obs.n_layers or 0, threshold=threshold, min_queries=min_queries)


def hidden_sinks(
    attentions: Sequence[torch.Tensor],
    *,
    causal: bool,
    key_padding: torch.Tensor | None = None,
    threshold: float = THRESHOLD,
    min_queries: int | None = MIN_QUERIES,
) -> dict:
    """The same summary as :class:`HiddenSinkObserver`, from full maps: one (B, H, N, N) per layer."""
    per_layer = {}
    for layer, alpha in enumerate(alphas_from_maps(attentions, causal=causal, key_padding=key_padding)):
        b, _, n = alpha.shape
        kp = torch.ones(b, n, dtype=torch.bool) if key_padding is None else key_padding.bool()
        n_real = kp.sum(1, keepdim=True)
        # queries seeing key k: real queries at or after k (causal) or all real queries
        count = (kp.flip(1).cumsum(1).flip(1) if causal else n_real.expand(b, n)).double() * kp
        first = kp.long().argmax(1)
        per_layer[layer] = _per_sample([(alpha, count, first)])
    return summarize_hidden_sinks(per_layer, len(attentions), threshold=threshold, min_queries=min_queries)


def hidden_sink_report(result: dict, input_ids: torch.Tensor, tokenizer, attention_mask: torch.Tensor | None = None) -> list[dict]:
    """Add token text to ``result["tokens"]``: each entry gets ``index`` (column in ``input_ids``),
    ``token_id`` and ``text`` (the decoded token, raw; escape it before putting it in HTML).

    Args:
        input_ids: (B, N) or (N,) the ids the observer saw.
        attention_mask: (B, N) 1 for real tokens, to map relative positions back to columns.
    """
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    first = torch.zeros(ids.shape[0], dtype=torch.long) if attention_mask is None else attention_mask.long().argmax(1)
    out = []
    for e in result["tokens"]:
        s = e["sample"]
        if s >= ids.shape[0]:
            raise ValueError(f"result names sample {s} but `input_ids` has {ids.shape[0]} rows")
        col = int(first[s]) + e["position"]
        if col >= ids.shape[1]:
            raise ValueError(f"result names position {e['position']} beyond `input_ids` length {ids.shape[1]}")
        tid = int(ids[s, col])
        out.append({**e, "index": col, "token_id": tid, "text": tokenizer.decode([tid])})
    return out
