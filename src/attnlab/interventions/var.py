"""VAR (text form): visual-attention-sink redistribution, applied to the sink tokens of a language model.

Paper: "See What You Are Told: Visual Attention Sink in Large Multimodal Models" (Kang et al., ICLR
2025, arXiv 2503.03321). VAR finds sink tokens through massive activations, picks the (head, query)
rows that attend to content rather than to the sinks, and moves part of their sink attention to the
content tokens. Text form, as here:

* sink tokens (per input, per layer l): the hidden state entering block l has
  max_{d in D_sink} |h_d| / rms(h) > ``tau`` (20), VAR's DimProspector rule; D_sink, model specific in
  VAR, is discovered on calibration prompts by :mod:`attnlab.analysis.massive_activations`;
* content-focused rows (VAR's image-centric heads, with "image" read as "all tokens"): in a chosen head,
  a query row whose attention on the sink tokens is at most ``rho`` (0.5);
* redistribution: on those rows, sink attention is multiplied by ``p`` (0.6) and the budget
  (1 - p) x (sink mass) goes to the non-sink tokens in proportion to their attention, exactly, as a
  per-row logit bias (:mod:`attnlab.interventions._redistribute`); fused SDPA kernels keep running.
  Layers 2..L-2 only (VAR skips the first two layers and the last).
Heads: "auto" keeps the ``n_heads`` heads with the largest share of content-focused rows on the
calibration prompts (a cap on cost: VAR itself selects rows in every head).
"""
from __future__ import annotations

import weakref
from typing import Iterable, Sequence

import torch

from ..probes.base import CallContext
from ._calibrate import check_calibration, left_padded
from ._heads import all_heads, by_layer, check_heads, model_shape
from ._redistribute import Handle, row_log_factor, scatter_bias, sink_mass
from .base import Modifier

TAU = 20.0  # VAR's threshold, as attnlab.analysis.massive_activations.TAU
P = 0.6  # share of the sink attention kept (VAR's p)
RHO = 0.5  # a row is content-focused when its sink mass is <= RHO (VAR's rho)
N_HEADS = 16
MAX_LEN = 512

_CHOICES: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _check_unit(value, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"`{arg}` must be a number in (0, 1]; got {arg}={value!r}")
    return float(value)


def sink_tokens(h: torch.Tensor, dims: Sequence[int], tau: float = TAU) -> torch.Tensor:
    """bool (B, N): tokens whose hidden state h (B, N, D) has |h_d| / rms(h) > tau on some d in ``dims``."""
    if not dims:
        return torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)
    x = h.float()
    normed = x[..., list(dims)] * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return normed.abs().amax(-1) > tau


class VARRedistribution(Modifier):
    """VAR on named heads (module doc). Sink tokens come from :meth:`see_hidden`, fed by block hooks.

    Args:
        heads: (layer, head) pairs. sink_dims: D_sink. p: sink share kept. rho: content-focus cut. tau: sink rule.
        record: count per head the rows seen and the content-focused ones (``stats``), for head choice.
    """

    def __init__(self, heads: Iterable[tuple[int, int]], sink_dims: Sequence[int], *, p: float = P, rho: float = RHO,
                 tau: float = TAU, record: bool = False) -> None:
        self.p, self.rho = _check_unit(p, "p"), _check_unit(rho, "rho")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau <= 0:
            raise ValueError(f"`tau` must be a number > 0; got {tau=!r}")
        self.tau, self.sink_dims, self.record = float(tau), tuple(int(d) for d in sink_dims), record
        self.heads = tuple(sorted({tuple(h) for h in heads}))
        self.layers = frozenset(layer for layer, _ in self.heads)
        self._per_layer = by_layer(self.heads)
        self._new: dict[int, torch.Tensor] = {}  # layer -> (B, Nq) sink flags of the tokens of the current call
        self._keys: dict[int, torch.Tensor] = {}  # layer -> (B, Nk) sink flags of every cached key
        self.stats: dict[tuple[int, int], list[float]] = {}  # (layer, head) -> [rows, content-focused rows]

    def see_hidden(self, layer: int, h: torch.Tensor) -> None:
        """Record the sink tokens among the hidden states (B, N, D) entering ``layer``."""
        if layer in self.layers:
            self._new[layer] = sink_tokens(h, self.sink_dims, self.tau)

    def key_sinks(self, ctx: CallContext) -> torch.Tensor:
        """bool (B, Nk): sink flags of all keys of this call (cached keys keep the flags they got)."""
        new = self._new.get(ctx.layer)
        if new is None or new.shape[-1] != ctx.n_q:
            raise RuntimeError("VARRedistribution needs the block hooks that `var()` installs (see_hidden)")
        offset = ctx.n_kv - ctx.n_q
        prev = self._keys.get(ctx.layer)
        if offset == 0:
            keys = new
        elif prev is not None and prev.shape[0] == new.shape[0] and prev.shape[-1] >= offset:
            keys = torch.cat([prev[:, :offset], new], -1)
        else:
            keys = torch.cat([new.new_zeros(new.shape[0], offset), new], -1)
        self._keys[ctx.layer] = keys
        return keys if ctx.key_padding is None else keys & ctx.key_padding.to(keys.device)

    def score_bias(self, ctx: CallContext) -> torch.Tensor | None:
        heads = self._per_layer.get(ctx.layer)
        if heads is None:
            return None
        keys = self.key_sinks(ctx)  # (B, Nk)
        if not bool(keys.any()):
            return None
        mass, visible = sink_mass(ctx, heads, keys)  # (B, Hs, Nq), fused: no (Nq, Nk) probabilities
        seen = visible.any(-1).expand(mass.shape[0], 1, -1)  # rows that see any key (B, 1, Nq)
        rows = (mass <= self.rho) & seen
        if self.record:
            for i, h in enumerate(heads):
                entry = self.stats.setdefault((ctx.layer, h), [0.0, 0.0])
                entry[0] += float(seen.sum())
                entry[1] += float(rows[:, i].sum())
        if self.p == 1.0:
            return None
        factor = row_log_factor(mass, self.p, rows)
        return scatter_bias(ctx.extra["query"].shape[1], heads, keys[:, None, :].expand(-1, len(heads), -1), factor)

    def __repr__(self) -> str:
        return f"VARRedistribution({len(self.heads)} heads, sink_dims={list(self.sink_dims)}, p={self.p}, rho={self.rho})"


def attach_var(model, modifier: VARRedistribution, observers=()) -> Handle:
    """Attach ``modifier`` (and ``observers``) with the block pre-hooks that show it the hidden states.

    Returns a :class:`Handle`; ``detach()`` removes the hooks and the attachment.
    """
    # lazy: attnlab.analysis and hf.attach import this package
    from ..analysis._modules import find_blocks, first_hidden
    from ..hf.attach import attach

    blocks = find_blocks(model)
    hooks = []
    for layer in sorted(modifier.layers):
        def hook(_module, args, kwargs, layer=layer):
            modifier.see_hidden(layer, first_hidden(args, kwargs))
        hooks.append(blocks[layer].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        attachment = attach(model, observers=observers, modifiers=[modifier])
    except BaseException:
        for h in hooks:
            h.remove()
        raise
    return Handle(attachment, hooks)


def discover_sink_dims(model, calibration, *, pad_id: int = 0, max_len: int = MAX_LEN) -> tuple[int, ...]:
    """D_sink: the massive-activation dimensions of ``model`` on the calibration prompts."""
    from ..analysis.massive_activations import MassiveActivations  # lazy: analysis imports hf.attach

    ids, mask = left_padded(calibration, pad_id, max_len, next(model.parameters()).device)
    with torch.no_grad(), MassiveActivations(model, attention_mask=mask) as ma:
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    return tuple(ma.result()["sink_dims"])


def choose_heads(model, calibration, sink_dims: Sequence[int], *, rho: float = RHO, tau: float = TAU,
                 pad_id: int = 0, max_len: int = MAX_LEN) -> dict[tuple[int, int], float]:
    """{(layer, head): share of its rows that are content-focused on the calibration prompts}, layers 2..L-2."""
    key = (tuple(map(tuple, calibration)), tuple(sink_dims), rho, tau, pad_id, max_len)
    cache = _CHOICES.setdefault(model, {})
    if key not in cache:
        n_layers, n_heads = model_shape(model)
        counter = VARRedistribution(all_heads(n_layers, n_heads, range(2, max(2, n_layers - 1))), sink_dims,
                                    p=1.0, rho=rho, tau=tau, record=True)
        ids, mask = left_padded(calibration, pad_id, max_len, next(model.parameters()).device)
        with torch.no_grad(), attach_var(model, counter):
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        cache[key] = {h: c / r for h, (r, c) in counter.stats.items() if r > 0}
    return dict(cache[key])


def var(model, tokenizer=None, calibration=None, *, heads: str | Iterable[tuple[int, int]] = "auto",
        n_heads: int = N_HEADS, p: float = P, rho: float = RHO, tau: float = TAU,
        sink_dims: Sequence[int] | None = None, max_len: int = MAX_LEN) -> Handle:
    """Apply VAR (text form) to ``model``; returns a :class:`Handle` (``detach()`` restores the model).

    Args:
        calibration: token-id prompts; needed unless both ``sink_dims`` and ``heads`` are given.
        heads: "auto" (module doc) or (layer, head) pairs. n_heads: heads kept by "auto".
        p, rho, tau: VAR's parameters (module doc). sink_dims: D_sink, or None to discover it.
        max_len: calibration prompts are cut to this many tokens.

    ``handle.info`` holds ``sink_dims`` and the chosen ``heads`` (with, for "auto", their content shares).
    """
    n_layers, n_q_heads = model_shape(model)
    _check_unit(p, "p"), _check_unit(rho, "rho")
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"`n_heads` must be an int >= 1; got {n_heads=!r}")
    if isinstance(heads, str) and heads != "auto":
        raise ValueError(f'`heads` must be "auto" or (layer, head) pairs; got {heads=!r}')
    calibration = check_calibration(calibration, required=sink_dims is None or heads == "auto")
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    info: dict = {}
    if sink_dims is None:
        sink_dims = discover_sink_dims(model, calibration, pad_id=pad_id, max_len=max_len)
    elif isinstance(sink_dims, (str, bytes)) or not all(isinstance(d, int) and d >= 0 for d in sink_dims):
        raise ValueError(f"`sink_dims` must be None or a sequence of dimension indices (ints >= 0); got {sink_dims=!r}")
    if heads == "auto":
        shares = choose_heads(model, calibration, sink_dims, rho=rho, tau=tau, pad_id=pad_id, max_len=max_len)
        ranked = sorted(((s, h) for h, s in shares.items() if s > 0), key=lambda t: (-t[0], t[1]))[:n_heads]
        chosen = tuple(sorted(h for _, h in ranked))
        info["content_share"] = {f"{l},{h}": s for (l, h), s in shares.items()}
    else:
        chosen = check_heads(list(heads), n_layers, n_q_heads)
    handle = attach_var(model, VARRedistribution(chosen, sink_dims, p=p, rho=rho, tau=tau))
    handle.info = {**info, "heads": [list(h) for h in chosen], "sink_dims": list(sink_dims), "p": p, "rho": rho}
    return handle
