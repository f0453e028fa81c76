"""ZeroTuning: head-specific scaling of the attention each query pays to the initial token.

Paper: "ZeroTuning: Unlocking the Initial Token's Power to Enhance Large Language Models Without
Training" (Han et al., arXiv 2505.11739). For a chosen head, the initial token's attention a0 becomes
a0' = gamma a0 / D and every other key's a_i' = a_i / D, with D = (gamma - 1) a0 + 1. That is exactly a
``log(gamma)`` bias on the initial token's logit, so it runs as a :meth:`Modifier.score_bias` and
fused SDPA kernels keep running.

Choosing heads and gamma (the paper's unsupervised mode: lower output entropy), on calibration prompts:
1. profiling: each head of the first ``profile_layers`` layers (early layers matter most, per the paper)
   is scaled alone by ``probe_gamma``; its score is the change of the mean entropy of the prompts'
   next-token distributions;
2. the ``n_heads`` heads whose scaling lowers the entropy most (and at all) are kept;
3. gamma is the value of ``gammas`` (1.0 included: no change) with the lowest mean entropy on them.

Cost (what changed to make this fast; the method and its numbers are the same): every probed head and
every gamma candidate is one copy of the prompts inside shared, large forward passes (:class:`_Copies`,
rows of a batch never mix, so each copy is exact), position ids count real tokens so left padding
changes nothing, and profiling uses only the first ``profile_prompts`` (8) calibration prompts (the
paper profiles on a small validation set; the gamma search still uses all of them). Before, a
32-prompt profile ran one pass per layer over 9 copies of 32 prompts (~22 min on one loaded core).
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
PROFILE_PROMPTS = 8  # head profiling uses the first 8 calibration prompts (cost; the gamma search uses all)
BATCH_TOKENS = 65536  # tokens per forward pass while profiling / searching (copies of the prompts)

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


class _Copies(Modifier):
    """Profiling aid: the batch holds ``n_copies`` copies of ``n_prompts`` prompts; copy r applies its own
    {(layer, head): log gamma} to the initial token (``first`` (P,), each prompt's first real key).

    One forward then measures many settings at once (every probed head, or every gamma candidate);
    each copy is computed exactly as it would be alone (rows of a batch never mix).
    """

    def __init__(self, settings: Sequence[dict[tuple[int, int], float]], n_prompts: int, first: torch.Tensor) -> None:
        self.n_prompts, self.first = n_prompts, first
        entries: dict[int, list[tuple[int, int, float]]] = {}
        for r, setting in enumerate(settings):
            for (layer, head), gamma in setting.items():
                if gamma != 1.0:
                    entries.setdefault(layer, []).append((r, head, math.log(gamma)))
        # per layer: (copy index (E,), head (E,), log gamma (E,)), built once, moved to the query's device per call
        self._per_layer = {layer: tuple(torch.tensor(col) for col in zip(*e)) for layer, e in entries.items()}
        self.layers = frozenset(self._per_layer)

    def score_bias(self, ctx: CallContext) -> torch.Tensor | None:
        entry = self._per_layer.get(ctx.layer)
        if entry is None:
            return None
        query = ctx.extra["query"]
        device, p = query.device, self.n_prompts
        copy, head, log_gamma = (t.to(device) for t in entry)
        rows = copy[:, None] * p + torch.arange(p, device=device)  # (E, P) batch rows of each entry's copy
        bias = torch.zeros(query.shape[0], query.shape[1], 1, ctx.n_kv, device=device)  # (B, Hq, 1, Nk)
        bias[rows, head[:, None].expand_as(rows), 0, self.first.to(device)[None].expand_as(rows)] = \
            log_gamma[:, None].to(bias.dtype).expand_as(rows)
        return bias


def mean_entropies(model, ids: torch.Tensor, mask: torch.Tensor, settings: Sequence[dict[tuple[int, int], float]],
                   batch_tokens: int = BATCH_TOKENS) -> list[float]:
    """Mean next-token entropy of the prompts ids/mask (P, T) under each setting {(layer, head): gamma}.

    The settings run as copies of the prompts in shared forward passes of about ``batch_tokens`` tokens.
    """
    from ..hf.attach import attach  # lazy: hf.attach imports this package's base

    p, t = ids.shape
    per_pass = max(1, batch_tokens // (p * t))
    first = mask.argmax(1)
    out: list[float] = []
    for start in range(0, len(settings), per_pass):
        chunk = settings[start:start + per_pass]
        mod = _Copies(chunk, p, first)
        with attach(model, modifiers=[mod] if mod.layers else []):
            ent = last_token_entropy(model, ids.repeat(len(chunk), 1), mask.repeat(len(chunk), 1))  # (C * P,)
        out += ent.view(len(chunk), p).mean(1).tolist()
    return out


def profile_heads(model, calibration: Sequence[Sequence[int]], *, layers: Iterable[int], probe_gamma: float = PROBE_GAMMA,
                  pad_id: int = 0, max_len: int = MAX_LEN, batch_tokens: int = BATCH_TOKENS) -> dict[tuple[int, int], float]:
    """{(layer, head): change of mean next-token entropy when only that head's initial token is scaled by probe_gamma}.

    Negative = the head lowers the entropy (more confident predictions). Every probed head is a copy of
    the prompts in shared forward passes (:func:`mean_entropies`). Cached per model and arguments (a
    harness calls this once per grid point).
    """
    n_layers, n_heads = model_shape(model)
    layers = tuple(layers)
    key = (tuple(map(tuple, calibration)), layers, float(probe_gamma), pad_id, max_len)
    cache = _PROFILES.setdefault(model, {})
    if key not in cache:
        ids, mask = left_padded(calibration, pad_id, max_len, _device(model))
        base = float(last_token_entropy(model, ids, mask).mean())
        probes = [(layer, head) for layer in layers for head in range(n_heads)]
        ents = mean_entropies(model, ids, mask, [{pair: probe_gamma} for pair in probes], batch_tokens)
        cache[key] = {pair: e - base for pair, e in zip(probes, ents)}
    return dict(cache[key])


def search_gamma(model, calibration, heads: Sequence[tuple[int, int]], gammas: Sequence[float] = GAMMAS, *,
                 pad_id: int = 0, max_len: int = MAX_LEN, batch_tokens: int = BATCH_TOKENS) -> tuple[float, dict[float, float]]:
    """(gamma with the lowest mean entropy on ``heads``, {gamma: mean entropy}); gamma 1.0 is the plain model."""
    ids, mask = left_padded(calibration, pad_id, max_len, _device(model))
    scaled = [g for g in gammas if g != 1.0]
    scores = dict(zip(scaled, mean_entropies(model, ids, mask, [{h: g for h in heads} for g in scaled], batch_tokens)))
    if len(scaled) < len(gammas):
        scores[1.0] = float(last_token_entropy(model, ids, mask).mean())
    scores = {g: scores[g] for g in gammas}
    return min(scores, key=scores.get), scores


def _device(model) -> torch.device:
    return next(model.parameters()).device


def zerotuning(model, tokenizer=None, calibration=None, *, gamma: float | None = None,
               heads: str | Iterable[tuple[int, int]] = "auto", n_heads: int = N_HEADS,
               profile_layers: int | None = None, probe_gamma: float = PROBE_GAMMA,
               gammas: Sequence[float] = GAMMAS, max_len: int = MAX_LEN, profile_prompts: int = PROFILE_PROMPTS,
               batch_tokens: int = BATCH_TOKENS):
    """Apply ZeroTuning to ``model``; returns the ``Attachment`` (``detach()`` restores the model).

    Args:
        calibration: token-id prompts; needed when ``heads="auto"`` or ``gamma=None``.
        gamma: the scale of the initial token's attention (> 0), or None to search ``gammas``.
        heads: "auto" (profiling, see module doc), "all" (every head of every layer), or (layer, head) pairs.
        n_heads: heads kept by profiling. profile_layers: how many first layers to profile (None: a third).
        probe_gamma: the scale used while profiling. max_len: calibration prompts are cut to this many tokens.
        profile_prompts: how many calibration prompts (the first) profile the heads; the gamma search uses all.
        batch_tokens: tokens per forward pass of the batched profiling and search (memory vs speed).
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
    for name, v in (("n_heads", n_heads), ("profile_prompts", profile_prompts), ("batch_tokens", batch_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must be an int >= 1; got {name}={v!r}")
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
        profile = profile_heads(model, calibration[:profile_prompts], layers=layers, probe_gamma=probe_gamma,
                                pad_id=pad_id, max_len=max_len, batch_tokens=batch_tokens)
        ranked = sorted((d, pair) for pair, d in profile.items() if d < 0)
        chosen = tuple(sorted(pair for _, pair in ranked[:n_heads]))
        info["profile"] = {f"{l},{h}": d for (l, h), d in profile.items()}
    elif isinstance(heads, str):
        raise ValueError(f'`heads` must be "auto", "all" or (layer, head) pairs; got {heads=!r}')
    else:
        chosen = check_heads(list(heads), n_layers, n_q_heads)
    if gamma is None and chosen:
        gamma, info["gamma_scores"] = search_gamma(model, calibration, chosen, gammas, pad_id=pad_id, max_len=max_len,
                                                   batch_tokens=batch_tokens)
    modifiers = [InitialTokenScale({h: gamma for h in chosen})] if chosen and gamma not in (None, 1.0) else []
    handle = attach(model, modifiers=modifiers)
    handle.info = {**info, "heads": [list(h) for h in chosen], "gamma": gamma}
    return handle
