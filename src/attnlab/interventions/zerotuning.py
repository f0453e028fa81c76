"""ZeroTuning: head-specific scaling of the attention each query pays to the initial token.

Paper: "ZeroTuning: Unlocking the Initial Token's Power to Enhance Large Language Models Without
Training" (Han et al., arXiv 2505.11739). For a chosen head, the initial token's attention a0 becomes
a0' = gamma a0 / D and every other key's a_i' = a_i / D, with D = (gamma - 1) a0 + 1. That is exactly a
``log(gamma)`` bias on the initial token's logit, so it runs as a :meth:`Modifier.score_bias` and
fused SDPA kernels keep running.

Choosing heads and gamma (the paper's unsupervised mode: lower output entropy), on calibration prompts:
1. profiling: each head of the first ``profile_layers`` layers (early layers matter most, per the paper)
   is scaled alone by ``probe_gamma`` (all heads of a layer in one batched pass); its score is the change of the mean entropy of the prompts'
   next-token distributions;
2. the ``n_heads`` heads whose scaling lowers the entropy most (and at all) are kept;
3. gamma is the value of ``gammas`` (1.0 included: no change) with the lowest mean entropy on them.
The paper's supervised mode (accuracy on labelled validation data) is what an evaluation harness does
when it picks among the registry's ``grid``.
"""
from __future__ import annotations

import math
import weakref
from typing import Iterable, Sequence

import torch

from ..probes.base import CallContext
from ._calibrate import check_calibration, last_token_entropy, left_padded
from ._heads import all_heads, by_layer, check_heads, model_shape
from .base import Modifier

GAMMAS = (0.5, 0.7, 1.0, 1.5, 2.0, 3.0)  # gamma candidates of the search (1.0 = leave the model as is)
PROBE_GAMMA = 1.5  # classification prefers gamma > 1 (paper); profiling asks which heads agree
N_HEADS = 8  # heads kept after profiling
MAX_LEN = 512  # calibration prompts are cut to their last MAX_LEN tokens (cost)

_PROFILES: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _check_gamma(gamma, arg: str = "gamma") -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"`{arg}` must be a finite number > 0 (1 leaves the model unchanged); got {gamma!r}")
    return float(gamma)


class InitialTokenScale(Modifier):
    """Scale the initial token's attention by gamma in named heads: a log(gamma) bias on its logit.

    Args:
        gammas: {(layer, head): gamma > 0}. The initial token is each sample's first real key (key 0
            without padding; the first unpadded key with left padding).

    Bias shape: (B|1, Hq, 1, Nk), zero except log(gamma) at the initial token of the named heads.
    """

    def __init__(self, gammas: dict[tuple[int, int], float]) -> None:
        self.gammas = {tuple(k): _check_gamma(v, f"gammas[{k}]") for k, v in gammas.items()}
        self.layers = frozenset(layer for layer, _ in self.gammas)
        self._per_layer = {
            layer: (heads, tuple(math.log(self.gammas[(layer, h)]) for h in heads))
            for layer, heads in by_layer(self.gammas).items()
        }
        self._biases: dict[tuple, torch.Tensor] = {}

    def score_bias(self, ctx: CallContext) -> torch.Tensor | None:
        entry = self._per_layer.get(ctx.layer)
        if entry is None:
            return None
        heads, logs = entry
        n_heads, device = ctx.extra["query"].shape[1], ctx.extra["query"].device
        first = None if ctx.key_padding is None else tuple(ctx.key_padding.long().argmax(1).tolist())
        # Layers with the same heads and gammas share one bias tensor, hence one folded mask per forward.
        key = (heads, logs, n_heads, ctx.n_kv, device, first)
        bias = self._biases.get(key)
        if bias is None:
            if len(self._biases) > 256:
                self._biases.clear()
            firsts = (0,) if first is None else first
            bias = torch.zeros(len(firsts), n_heads, 1, ctx.n_kv, device=device)
            log_t = torch.tensor(logs, device=device)
            for b, col in enumerate(firsts):
                bias[b, list(heads), 0, col] = log_t
            self._biases[key] = bias
        return bias

    def __repr__(self) -> str:
        return f"InitialTokenScale({self.gammas})"


def _mean_entropy(model, ids, mask, gammas: dict | None) -> float:
    from ..hf.attach import attach  # lazy: hf.attach imports this package's base

    if not gammas:
        return float(last_token_entropy(model, ids, mask).mean())
    with attach(model, modifiers=[InitialTokenScale(gammas)]):
        return float(last_token_entropy(model, ids, mask).mean())


class _ProbeEachHead(Modifier):
    """Profiling aid: the batch holds ``n_heads`` copies of the prompts; copy r scales head r of ``layer``."""

    def __init__(self, layer: int, gamma: float, n_prompts: int, first: torch.Tensor) -> None:
        self.layer, self.log_gamma, self.n_prompts, self.first = layer, math.log(gamma), n_prompts, first
        self.layers = frozenset({layer})

    def score_bias(self, ctx: CallContext) -> torch.Tensor | None:
        if ctx.layer != self.layer:
            return None
        b, n_heads = ctx.extra["query"].shape[:2]
        bias = torch.zeros(b, n_heads, 1, ctx.n_kv, device=ctx.extra["query"].device)
        rows = torch.arange(b)
        bias[rows, rows // self.n_prompts, 0, self.first.repeat(b // self.n_prompts)] = self.log_gamma
        return bias


def profile_heads(model, calibration: Sequence[Sequence[int]], *, layers: Iterable[int], probe_gamma: float = PROBE_GAMMA,
                  pad_id: int = 0, max_len: int = MAX_LEN) -> dict[tuple[int, int], float]:
    """{(layer, head): change of mean next-token entropy when only that head's initial token is scaled by probe_gamma}.

    Negative = the head lowers the entropy (more confident predictions). One forward pass per layer, its
    batch holding one copy of the prompts per head. Cached per model and arguments (a harness calls
    this once per grid point).
    """
    from ..hf.attach import attach  # lazy: hf.attach imports this package's base

    n_layers, n_heads = model_shape(model)
    layers = tuple(layers)
    key = (tuple(map(tuple, calibration)), layers, float(probe_gamma), pad_id, max_len)
    cache = _PROFILES.setdefault(model, {})
    if key not in cache:
        ids, mask = left_padded(calibration, pad_id, max_len)
        p = ids.shape[0]
        base = float(last_token_entropy(model, ids, mask).mean())
        first = mask.argmax(1)
        scores = {}
        for layer in layers:
            with attach(model, modifiers=[_ProbeEachHead(layer, probe_gamma, p, first)]):
                ent = last_token_entropy(model, ids.repeat(n_heads, 1), mask.repeat(n_heads, 1))  # (H * P,)
            for head, e in enumerate(ent.view(n_heads, p).mean(1).tolist()):
                scores[(layer, head)] = e - base
        cache[key] = scores
    return dict(cache[key])


def search_gamma(model, calibration, heads: Sequence[tuple[int, int]], gammas: Sequence[float] = GAMMAS, *,
                 pad_id: int = 0, max_len: int = MAX_LEN) -> tuple[float, dict[float, float]]:
    """(gamma with the lowest mean entropy on ``heads``, {gamma: mean entropy})."""
    ids, mask = left_padded(calibration, pad_id, max_len)
    scores = {g: _mean_entropy(model, ids, mask, {h: g for h in heads} if g != 1.0 else None) for g in gammas}
    return min(scores, key=scores.get), scores


def zerotuning(model, tokenizer=None, calibration=None, *, gamma: float | None = None,
               heads: str | Iterable[tuple[int, int]] = "auto", n_heads: int = N_HEADS,
               profile_layers: int | None = None, probe_gamma: float = PROBE_GAMMA,
               gammas: Sequence[float] = GAMMAS, max_len: int = MAX_LEN):
    """Apply ZeroTuning to ``model``; returns the ``Attachment`` (``detach()`` restores the model).

    Args:
        calibration: token-id prompts; needed when ``heads="auto"`` or ``gamma=None``.
        gamma: the scale of the initial token's attention (> 0), or None to search ``gammas``.
        heads: "auto" (profiling, see module doc), "all" (every head of every layer), or (layer, head) pairs.
        n_heads: heads kept by profiling. profile_layers: how many first layers to profile (None: a third).
        probe_gamma: the scale used while profiling. max_len: calibration prompts are cut to this many tokens.
        tokenizer: its pad token id pads the calibration batch (0 if None).

    The attachment's ``info`` holds the chosen ``heads``, ``gamma`` and the profiling/search scores.
    """
    from ..hf.attach import attach  # lazy: hf.attach imports this package's base

    n_layers, n_q_heads = model_shape(model)
    if gamma is not None:
        gamma = _check_gamma(gamma)
    for g in gammas:
        _check_gamma(g, "gammas")
    _check_gamma(probe_gamma, "probe_gamma")
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"`n_heads` must be an int >= 1; got {n_heads=!r}")
    if profile_layers is not None and (isinstance(profile_layers, bool) or not isinstance(profile_layers, int)
                                       or not 1 <= profile_layers <= n_layers):
        raise ValueError(f"`profile_layers` must be None or an int in [1, {n_layers}]; got {profile_layers=!r}")
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    need_data = heads == "auto" or gamma is None
    calibration = check_calibration(calibration, required=need_data)
    info: dict = {}
    if heads == "all":
        chosen = all_heads(n_layers, n_q_heads)
    elif heads == "auto":
        layers = range(profile_layers or max(1, n_layers // 3))
        profile = profile_heads(model, calibration, layers=layers, probe_gamma=probe_gamma, pad_id=pad_id, max_len=max_len)
        ranked = sorted((d, pair) for pair, d in profile.items() if d < 0)
        chosen = tuple(sorted(pair for _, pair in ranked[:n_heads]))
        info["profile"] = {f"{l},{h}": d for (l, h), d in profile.items()}
    elif isinstance(heads, str):
        raise ValueError(f'`heads` must be "auto", "all" or (layer, head) pairs; got {heads=!r}')
    else:
        chosen = check_heads(list(heads), n_layers, n_q_heads)
    if gamma is None and chosen:
        gamma, info["gamma_scores"] = search_gamma(model, calibration, chosen, gammas, pad_id=pad_id, max_len=max_len)
    modifiers = [InitialTokenScale({h: gamma for h in chosen})] if chosen and gamma not in (None, 1.0) else []
    handle = attach(model, modifiers=modifiers)
    handle.info = {**info, "heads": [list(h) for h in chosen], "gamma": gamma}
    return handle
