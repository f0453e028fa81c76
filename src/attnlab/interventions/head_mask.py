"""Head masking and scaling: multiply the outputs of named heads by a constant (0 masks them).

Plain primitives for users (ablation, the head-output scaling of VHR-style methods): the per-head
attention output (B, H, T_q, D_v), before the output projection, is multiplied by ``scale`` for the
named ``(layer, head)`` pairs of query heads. Every other head's output is left bit-identical (it is
multiplied by exactly 1.0). Only ``modify_output`` is used, so fused SDPA kernels keep running.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from ..probes.base import CallContext
from ._heads import by_layer, check_heads, model_shape
from .base import Modifier


class HeadScale(Modifier):
    """Multiply named heads' outputs: ``scales`` maps (layer, head) -> a finite float >= 0.

    Shapes: output (B, H, T_q, D_v) per call; heads of other layers are untouched.
    """

    def __init__(self, scales: dict[tuple[int, int], float]) -> None:
        for pair, s in scales.items():
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
                raise ValueError(f"scale for head {pair} must be a finite number >= 0; got {s=!r}")
        self.scales = dict(scales)
        self.layers = frozenset(layer for layer, _ in scales)
        self._per_layer = {
            layer: (heads, [float(scales[(layer, h)]) for h in heads]) for layer, heads in by_layer(scales).items()
        }
        self._vectors: dict[tuple, torch.Tensor] = {}

    def _vector(self, layer: int, n_heads: int, like: torch.Tensor) -> torch.Tensor:
        """(1, H, 1, 1) multipliers: 1.0 for unnamed heads, so their outputs stay bit-identical."""
        key = (layer, n_heads, like.dtype, like.device)
        vec = self._vectors.get(key)
        if vec is None:
            heads, values = self._per_layer[layer]
            if heads[-1] >= n_heads:
                raise ValueError(f"head {heads[-1]} of layer {layer} does not exist: the call has {n_heads} heads")
            vec = torch.ones(n_heads, dtype=like.dtype, device=like.device)
            vec[list(heads)] = torch.tensor(values, dtype=like.dtype, device=like.device)
            vec = self._vectors[key] = vec.view(1, n_heads, 1, 1)
        return vec

    def modify_output(self, ctx: CallContext, output: torch.Tensor) -> torch.Tensor:
        if ctx.layer not in self._per_layer:
            return output
        return output * self._vector(ctx.layer, output.shape[1], output)

    def __repr__(self) -> str:
        return f"HeadScale({len(self.scales)} heads in layers {sorted(self.layers)})"


def head_scale(model, tokenizer=None, calibration=None, *, heads: Iterable[tuple[int, int]],
               scale: float | Sequence[float] = 1.0):
    """Attach a :class:`HeadScale` to ``model``; returns the ``Attachment`` (``detach()`` restores it).

    Args:
        heads: (layer, head) pairs of query heads.
        scale: one multiplier for all ``heads``, or one per pair (same order); finite, >= 0.
        tokenizer, calibration: unused (the registry's common signature).
    """
    from ..hf.attach import attach  # lazy: hf.attach imports this package's base

    n_layers, n_heads = model_shape(model)
    heads = list(heads) if not isinstance(heads, (str, bytes)) and isinstance(heads, Iterable) else heads
    named = check_heads(heads, n_layers, n_heads)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        scales = {pair: float(scale) for pair in named}
    elif isinstance(scale, Sequence) and not isinstance(scale, (str, bytes)):
        if len(scale) != len(heads):
            raise ValueError(f"`scale` must be one number or one per head; got {len(scale)=} for {len(heads)} heads")
        scales = {}
        for pair, s in zip(heads, scale):
            scales[tuple(pair)] = s
    else:
        raise ValueError(f"`scale` must be a number or a sequence of numbers; got {type(scale)=}")
    for s in scales.values():
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
            raise ValueError(f"`scale` must be finite and >= 0 (0 masks a head); got {scale=!r}")
    return attach(model, modifiers=[HeadScale(scales)])


def head_mask(model, tokenizer=None, calibration=None, *, heads: Iterable[tuple[int, int]]):
    """Zero the outputs of ``heads`` ((layer, head) pairs); returns the ``Attachment``."""
    return head_scale(model, tokenizer, calibration, heads=heads, scale=0.0)
