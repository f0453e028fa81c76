"""ACT: attention calibration that moves the surplus of hidden attention sinks to the other tokens.

Paper: "Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models without
Training through Attention Calibration" (Yu et al., ICML 2024, arXiv 2406.15765).

Per input and per chosen head (input-adaptive):
1. detection, as :mod:`attnlab.analysis.hidden_sinks`: key j is a sink when its normalised column mass
   alpha_j = sum_i A[i, j] / (#queries that see j) exceeds ``threshold`` (0.1, the ACT code's THRES);
   the first real token (the ordinary sink) is left alone, and keys seen by too few queries are not
   called sinks (``min_queries``, hidden_sinks' documented default);
2. calibration: A[i, S] <- beta A[i, S] (beta = 0.4), the removed mass going to the other keys in
   proportion to their attention, done exactly as a per-row logit bias on the sink columns
   (:mod:`attnlab.interventions._redistribute`), so fused SDPA kernels keep running.
During cached decoding a layer reuses the sinks detected in its latest multi-token call.

Head choice (the paper: a greedy search, each head tested alone on labelled calibration data, kept if
accuracy rises). Here, from unlabelled calibration prompts: candidates are the heads of layers
2..L-2 with the most hidden sinks on the prompts (``max_candidates``); each is calibrated alone and
kept when the prompts' own negative log-likelihood falls; the ``n_heads`` largest falls are used.
"""
from __future__ import annotations

import math
import weakref
from typing import Iterable

import torch

from ..probes.base import CallContext
from ._calibrate import check_calibration, left_padded, prompt_nll
from ._heads import all_heads, by_layer, check_heads, model_shape
from ._redistribute import head_probs, row_log_factor, scatter_bias
from .base import Modifier

BETA = 0.4  # the ACT code's calibration factor
THRESHOLD = 0.1  # the ACT code's THRES, as attnlab.analysis.hidden_sinks.THRESHOLD
N_HEADS = 8
MAX_CANDIDATES = 16
MAX_LEN = 512

_CHOICES: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _check_fraction(value, arg: str, *, low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
        raise ValueError(f"`{arg}` must be a number in (0, 1]; got {value!r}")
    return float(value)


def detect_sinks(probs: torch.Tensor, visible: torch.Tensor, *, threshold: float = THRESHOLD,
                 min_queries: int | None = None) -> torch.Tensor:
    """bool (B, Hs, Nk): hidden sinks of each head, from its probabilities (B, Hs, Nq, Nk).

    ``visible`` (B|1, 1, Nq, Nk) tells which queries see which keys (the column normaliser). The first
    real key is never a sink here (module doc).
    """
    # lazy: attnlab.analysis imports hf.attach, which imports this package
    from ..analysis.hidden_sinks import min_queries_for

    count = visible.sum(2).float()  # (B|1, 1, Nk) queries that see each key
    alpha = probs.sum(2) / count.clamp_min(1.0)  # (B, Hs, Nk)
    real = visible.any(2)  # (B|1, 1, Nk)
    n_real = real.sum(-1, keepdim=True)  # (B|1, 1, 1)
    cut = torch.tensor([[[min_queries_for(int(n), min_queries)]] for n in n_real.flatten().tolist()],
                       device=probs.device, dtype=count.dtype)
    sinks = (alpha > threshold) & (count >= cut) & real
    first = real.long().argmax(-1)  # (B|1, 1)
    sinks.scatter_(-1, first[..., None].expand(sinks.shape[0], sinks.shape[1], 1), False)
    return sinks


class ACTCalibration(Modifier):
    """ACT on named heads: hidden sinks found per input, their surplus moved to the other keys.

    Args:
        heads: (layer, head) pairs. beta: the share of a sink's attention kept (0 < beta <= 1).
        threshold, min_queries: the detection rule (module doc).
        record: also count, per head, the rows seen and the sinks found (``stats``), for head choice.

    Bias: a RankOneBias, per-row log factors (B, Hq, Nq, 1) times sink-column indicators (B, Hq, 1, Nk).
    """

    def __init__(self, heads: Iterable[tuple[int, int]], *, beta: float = BETA, threshold: float = THRESHOLD,
                 min_queries: int | None = None, record: bool = False) -> None:
        self.beta = _check_fraction(beta, "beta")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"`threshold` must be in (0, 1); got {threshold=!r}")
        self.threshold, self.min_queries, self.record = threshold, min_queries, record
        self.heads = tuple(sorted({tuple(h) for h in heads}))
        self.layers = frozenset(layer for layer, _ in self.heads)
        self._per_layer = by_layer(self.heads)
        self._sinks: dict[int, torch.Tensor] = {}  # layer -> (B, Hs, Nk) sinks of its latest multi-token call
        self.stats: dict[tuple[int, int], list[float]] = {}  # (layer, head) -> [calls, sinks found]

    def sinks_for(self, ctx: CallContext, probs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """(B, Hs, Nk) sinks for this call: detected on multi-token calls, reused (padded) while decoding."""
        prev = self._sinks.get(ctx.layer)
        if ctx.n_q == 1 and prev is not None and prev.shape[0] == probs.shape[0] and prev.shape[-1] <= ctx.n_kv:
            return torch.nn.functional.pad(prev, (0, ctx.n_kv - prev.shape[-1]))
        sinks = detect_sinks(probs, visible, threshold=self.threshold, min_queries=self.min_queries)
        self._sinks[ctx.layer] = sinks
        return sinks

    def score_bias(self, ctx: CallContext) -> torch.Tensor | None:
        heads = self._per_layer.get(ctx.layer)
        if heads is None:
            return None
        probs, visible = head_probs(ctx, heads)  # (B, Hs, Nq, Nk)
        sinks = self.sinks_for(ctx, probs, visible)
        if self.record:
            for i, h in enumerate(heads):
                entry = self.stats.setdefault((ctx.layer, h), [0.0, 0.0])
                entry[0] += probs.shape[0]
                entry[1] += float(sinks[:, i].sum())
        if self.beta == 1.0 or not bool(sinks.any()):
            return None
        mass = (probs * sinks[:, :, None, :]).sum(-1)  # (B, Hs, Nq)
        factor = row_log_factor(mass, self.beta)
        return scatter_bias(ctx.extra["query"].shape[1], heads, sinks, factor)

    def __repr__(self) -> str:
        return f"ACTCalibration({len(self.heads)} heads, beta={self.beta})"


def choose_heads(model, calibration, *, beta: float = BETA, max_candidates: int = MAX_CANDIDATES,
                 pad_id: int = 0, max_len: int = MAX_LEN) -> dict:
    """Rank heads for ACT on calibration prompts (module doc). Cached per model and arguments.

    Returns ``{"candidates": {(l, h): mean hidden sinks per prompt}, "gain": {(l, h): NLL fall when calibrated alone}}``.
    """
    from ..hf.attach import attach  # lazy: hf.attach imports this package's base

    key = (tuple(map(tuple, calibration)), beta, max_candidates, pad_id, max_len)
    cache = _CHOICES.setdefault(model, {})
    if key in cache:
        return cache[key]
    n_layers, n_heads = model_shape(model)
    ids, mask = left_padded(calibration, pad_id, max_len, next(model.parameters()).device)
    counter = ACTCalibration(all_heads(n_layers, n_heads, range(2, max(2, n_layers - 1))), beta=1.0, record=True)
    with torch.no_grad(), attach(model, modifiers=[counter]):
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    per_head = {h: s / max(c, 1.0) for h, (c, s) in counter.stats.items() if s > 0}
    candidates = dict(sorted(per_head.items(), key=lambda kv: (-kv[1], kv[0]))[:max_candidates])
    base = float(prompt_nll(model, ids, mask).mean())
    gain = {}
    for head in candidates:
        with attach(model, modifiers=[ACTCalibration([head], beta=beta)]):
            gain[head] = base - float(prompt_nll(model, ids, mask).mean())
    cache[key] = {"candidates": candidates, "gain": gain}
    return cache[key]


def act(model, tokenizer=None, calibration=None, *, heads: str | Iterable[tuple[int, int]] = "auto",
        n_heads: int = N_HEADS, beta: float = BETA, threshold: float = THRESHOLD, min_queries: int | None = None,
        max_candidates: int = MAX_CANDIDATES, max_len: int = MAX_LEN):
    """Apply ACT to ``model``; returns the ``Attachment`` (``detach()`` restores the model).

    Args:
        calibration: token-id prompts; needed when ``heads="auto"``.
        heads: "auto" (choice on calibration, module doc) or (layer, head) pairs.
        n_heads: heads kept by "auto". beta: share of a sink's attention kept. threshold, min_queries: detection.
        max_candidates: heads tested alone by "auto". max_len: calibration prompts are cut to this many tokens.

    The attachment's ``info`` holds the chosen ``heads`` and, for "auto", the candidates and their NLL gains.
    """
    from ..hf.attach import attach  # lazy: hf.attach imports this package's base

    n_layers, n_q_heads = model_shape(model)
    _check_fraction(beta, "beta")
    for name, v in (("n_heads", n_heads), ("max_candidates", max_candidates)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must be an int >= 1; got {name}={v!r}")
    info: dict = {}
    if heads == "auto":
        calibration = check_calibration(calibration)
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        choice = choose_heads(model, calibration, beta=beta, max_candidates=max_candidates, pad_id=pad_id, max_len=max_len)
        kept = sorted(((g, h) for h, g in choice["gain"].items() if g > 0), reverse=True)[:n_heads]
        chosen = tuple(sorted(h for _, h in kept))
        info["candidates"] = {f"{l},{h}": v for (l, h), v in choice["candidates"].items()}
        info["gain"] = {f"{l},{h}": v for (l, h), v in choice["gain"].items()}
    elif isinstance(heads, str):
        raise ValueError(f'`heads` must be "auto" or (layer, head) pairs; got {heads=!r}')
    else:
        chosen = check_heads(list(heads), n_layers, n_q_heads)
    modifier = ACTCalibration(chosen, beta=beta, threshold=threshold, min_queries=min_queries)
    handle = attach(model, modifiers=[modifier] if chosen else [])
    handle.info = {**info, "heads": [list(h) for h in chosen], "beta": beta}
    return handle
