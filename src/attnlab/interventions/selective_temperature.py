"""Selective temperature at inference: a per-query softmax temperature from position and query norm.

Paper: "Selective Attention: Enhancing Transformer through Principled Context Control" (Zhang et al.,
NeurIPS 2024, arXiv 2410.02703). Its Selective Self-Attention (SSA) multiplies each query by a
temperature made of a position term (growing with the log of the query's position, against the
"attention dilution" of long contexts) and a token term (a small learned function of the token,
weight-shared), and fine-tunes the model with it. As we read the paper, both terms are learned.

Training-free form used here (nothing is trained; two scalars chosen on a dev split):

    s_{l,h,i} = (1 + alpha * ln(1 + p_i / ell)) * (||q_{l,h,i}|| / r_{l,h}) ** gamma
    logits_{l,h,i,j} = s_{l,h,i} * scaling * q_{l,h,i} . k_{l,h,j}

with p_i the query's position (cache slot), ``ell`` a length scale, and r_{l,h} the median query norm
of head (l, h) measured on calibration prompts. ``alpha > 0`` sharpens later queries (the position
term); ``gamma > 0`` makes queries that are already confident (large norm) sharper still and weak
ones flatter (the token term), ``gamma < 0`` the reverse. s = 1 everywhere (alpha = gamma = 0) is the
unmodified model. Differences from the trained SSA: fixed functional forms instead of learned ones,
no value temperature, no fine-tuning, and the norm is the only token feature used.

Mechanism: scaling a query row by s scales its logits by s, and RoPE is linear and norm-preserving,
so the factor is applied to the query projection's output (``q_proj``, or ``q_norm`` where a model
normalises queries) by a forward hook. The attention kernel is untouched: fused SDPA keeps running.
:class:`QueryScale` is that hook, reused by :mod:`attnlab.interventions.head_modulation`.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch


PAPER = "Selective Attention: Enhancing Transformer through Principled Context Control"

#: factor(layer, q (B, N, H, D), positions (B|1, N) long) -> (B|1, N|1, H) multipliers of the query rows
Factor = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def _query_source(attn: torch.nn.Module) -> torch.nn.Module:
    """The sub-module whose output is the query before RoPE: ``q_norm`` if present, else ``q_proj``."""
    for name in ("q_norm", "q_proj"):
        mod = getattr(attn, name, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    raise ValueError(f"{type(attn).__name__} has no q_proj: query scaling needs a Llama-like attention module")


class QueryScale:
    """Multiply every query vector of the named layers by ``factor(layer, q, positions)``; a context manager.

    Equivalent to dividing the softmax temperature of that query row by the factor. Works on any
    attention kernel (the hook acts before it). Layers not in ``layers`` are untouched.

    Args:
        model: a transformers model with pre-norm decoder blocks (``self_attn.q_proj``).
        factor: see :data:`Factor`; returns multipliers broadcastable to (B, N, H).
        layers: layer indices to hook.
    """

    def __init__(self, model: torch.nn.Module, factor: Factor, layers: Sequence[int]) -> None:
        from ..analysis._modules import find_blocks  # lazy: attnlab.analysis imports hf.attach, which imports us

        blocks = find_blocks(model)
        self.model, self.factor, self.layers = model, factor, tuple(layers)
        self._positions: dict[int, torch.Tensor | None] = {}
        self._handles: list = []
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.n_heads = config.num_attention_heads
        try:
            for layer in self.layers:
                attn = getattr(blocks[layer], "self_attn", None)
                if attn is None:
                    raise ValueError(f"layer {layer} has no self_attn; query scaling supports Llama-like decoders")
                self._handles.append(attn.register_forward_pre_hook(self._remember(layer), with_kwargs=True))
                self._handles.append(_query_source(attn).register_forward_hook(self._scale(layer)))
        except BaseException:
            self.detach()
            raise

    def _remember(self, layer: int):
        def hook(_module, args, kwargs):
            self._positions[layer] = kwargs.get("position_ids")
        return hook

    def _scale(self, layer: int):
        def hook(_module, _args, out):
            b, n = out.shape[:2]
            q = out.view(b, n, self.n_heads, -1)  # (B, N, H, D), works for q_proj's (B, N, H*D) too
            pos = self._positions.get(layer)
            if pos is None:  # no position ids passed: positions are 0..N-1
                pos = torch.arange(n, device=out.device)[None]
            s = self.factor(layer, q, pos).to(out.dtype)
            return (q * s[..., None]).view_as(out)
        return hook

    def detach(self) -> None:
        """Remove the hooks (idempotent); the model is then exactly as before."""
        for h in self._handles:
            h.remove()
        self._handles, self._positions = [], {}

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "QueryScale":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        return f"QueryScale({type(self.model).__name__}, layers={list(self.layers)}, active={self.active})"


def query_norms(model: torch.nn.Module, calibration: Sequence[Sequence[int]], layers: Sequence[int]) -> torch.Tensor:
    """(L, H) median query norm per head of ``layers`` over every token of the ``calibration`` prompts."""
    seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}

    def record(layer, q, pos):
        seen[layer].append(q.detach().float().norm(dim=-1).reshape(-1, q.shape[2]))  # (B*N, H)
        return torch.ones((), dtype=q.dtype, device=q.device)

    device = next(model.parameters()).device
    with QueryScale(model, record, layers), torch.no_grad():
        for ids in calibration:
            model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
    return torch.stack([torch.cat(seen[layer]).median(dim=0).values for layer in layers])


def temperature_factor(alpha: float, gamma: float, ell: float, reference: dict[int, torch.Tensor] | None) -> Factor:
    """The factor s of the module docstring; ``reference`` maps layer -> (H,) median query norms."""

    def factor(layer: int, q: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        s = (1.0 + alpha * torch.log1p(pos.to(torch.float32) / ell))[..., None]  # (B|1, N, 1)
        if gamma:
            ratio = q.float().norm(dim=-1) / reference[layer].to(q.device)  # (B, N, H)
            s = s * ratio.clamp_min(1e-6).pow(gamma)
        return s

    return factor


def selective_temperature(
    model: torch.nn.Module,
    tokenizer=None,
    calibration: Sequence[Sequence[int]] | None = None,
    *,
    alpha: float = 0.1,
    gamma: float = 0.0,
    ell: float = 32.0,
    layers: Sequence[int] | None = None,
) -> QueryScale:
    """Apply the training-free selective temperature (module docstring) to ``layers`` (default: all).

    Args:
        calibration: token-id prompts; needed when ``gamma != 0`` (to measure r_{l,h}).
        alpha: strength of the position term, >= 0. gamma: exponent of the query-norm term (any
            finite float; 0 turns it off). ell: length scale of the position term, > 0.
        tokenizer: unused (the registry's common signature).

    Returns:
        An active :class:`QueryScale`; ``detach()`` restores the model bit-identically.
    """
    from ..analysis._modules import find_blocks  # lazy (see QueryScale)

    n = len(find_blocks(model))
    for name, value, ok in (("alpha", alpha, lambda v: v >= 0), ("gamma", gamma, lambda v: True), ("ell", ell, lambda v: v > 0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise ValueError(f"{name} must be a finite number{' >= 0' if name == 'alpha' else ' > 0' if name == 'ell' else ''}; got {name}={value!r}")
    layers = list(range(n)) if layers is None else list(layers)
    if not layers or any(isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < n for l in layers):
        raise ValueError(f"layers must be a non-empty list of layer indices in [0, {n}); got {layers=}")
    reference = None
    if gamma:
        if not calibration or isinstance(calibration, (str, bytes)) or not all(len(p) for p in calibration):
            raise ValueError(f"gamma != 0 needs calibration prompts (non-empty token-id lists) to measure query norms; got {gamma=}")
        norms = query_norms(model, calibration, layers)
        reference = {layer: norms[i] for i, layer in enumerate(layers)}
    return QueryScale(model, temperature_factor(float(alpha), float(gamma), float(ell), reference), layers)
