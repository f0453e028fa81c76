"""Head modulation: scale the heads most sensitive to the context, by how sensitive they are.

Papers: "Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large Vision-Language
Model" (Arif et al., arXiv 2501.12206: head-specific modulation by measured visual sensitivity) and
"Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence" (He et al., ACL 2025,
arXiv 2412.13949: VHD_{l,h} = ||o_{l,h}(with image) - o_{l,h}(without image)||, then VHR scales the
outputs of high-VHD heads by alpha = 2).

Text-only form (there is no image here; the "visual context" becomes the prompt's context):

* sensitivity (a context-aware head divergence) of head (l, h):
  d_{l,h} = mean over calibration prompts and their last ``n_last`` tokens of
  ||o_{l,h}(token | whole prompt) - o_{l,h}(token | first token + last ``keep_last`` tokens)||_2,
  where o_{l,h} is the head's attention output (B, N, D_v) before the output projection. The first
  token is kept in the shortened prompt so that both runs have their usual attention sink.
* chosen heads: the ``per_layer`` heads with the largest d in each layer of ``layers``;
* modulation, differential as in Arif et al.: s_{l,h} = 1 + (alpha - 1) * d_{l,h} / max_h' d_{l,h'}
  for the chosen heads (the most sensitive head of a layer gets alpha), 1 for all others.
  ``mode="output"`` multiplies the head's output by s (VHR; keeps fused SDPA, via
  :class:`attnlab.interventions.head_mask.HeadScale`); ``mode="attention"`` multiplies the head's
  attention logits by s, i.e. sharpens (s > 1) or flattens its attention (via
  :class:`attnlab.interventions.selective_temperature.QueryScale`, also kernel-agnostic).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ._heads import model_shape
from .head_mask import HeadScale
from .selective_temperature import QueryScale

PAPERS = (
    "Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large Vision-Language Model",
    "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence",
)


def _head_outputs(model, ids: list[int], n_last: int) -> list[torch.Tensor]:
    """Per layer, (n_last, H, D_v) float64 head outputs of the last ``n_last`` tokens of ``ids``."""
    from ..analysis._modules import find_blocks, out_proj  # lazy: attnlab.analysis imports hf.attach

    blocks = find_blocks(model)
    _, n_heads = model_shape(model)
    outs: list[torch.Tensor | None] = [None] * len(blocks)

    def grab(layer):
        def hook(_module, args):
            x = args[0][0, -n_last:]  # (n_last, H * D_v)
            outs[layer] = x.reshape(x.shape[0], n_heads, -1).double()
        return hook

    handles = [out_proj(b).register_forward_pre_hook(grab(i)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids], device=next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return outs


def head_sensitivity(
    model: torch.nn.Module, calibration: Sequence[Sequence[int]], *, keep_last: int = 16, n_last: int = 4
) -> torch.Tensor:
    """(L, H) float64 context-aware head divergence d_{l,h} (module docstring) over ``calibration``.

    Prompts with at most ``keep_last + 1`` tokens have no context to remove and are skipped.
    """
    for name, v in (("keep_last", keep_last), ("n_last", n_last)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1; got {name}={v!r}")
    if n_last > keep_last:
        raise ValueError(f"n_last must be <= keep_last (the compared tokens must survive the cut); got {n_last=}, {keep_last=}")
    total, count = None, 0
    for ids in calibration:
        ids = list(ids)
        if len(ids) <= keep_last + 1:
            continue
        full = _head_outputs(model, ids, n_last)
        short = _head_outputs(model, ids[:1] + ids[-keep_last:], n_last)
        d = torch.stack([(f - s).norm(dim=-1).mean(0) for f, s in zip(full, short)])  # (L, H)
        total = d if total is None else total + d
        count += 1
    if not count:
        raise ValueError(f"calibration must hold at least one prompt longer than keep_last + 1 = {keep_last + 1} tokens")
    return total / count


def modulation_scales(
    sensitivity: torch.Tensor, *, alpha: float, per_layer: int, layers: Sequence[int] | None = None
) -> dict[tuple[int, int], float]:
    """{(layer, head): s} for the ``per_layer`` most sensitive heads of each of ``layers`` (all by default)."""
    n_layers, n_heads = sensitivity.shape
    layers = range(n_layers) if layers is None else layers
    scales = {}
    for layer in layers:
        d = sensitivity[layer]
        top = torch.topk(d, per_layer).indices.tolist()
        peak = float(d.max())
        for h in top:
            rel = float(d[h]) / peak if peak > 0 else 1.0
            scales[(layer, h)] = 1.0 + (alpha - 1.0) * rel
    return scales


def head_modulation(
    model: torch.nn.Module,
    tokenizer=None,
    calibration: Sequence[Sequence[int]] = (),
    *,
    alpha: float = 1.5,
    per_layer: int = 1,
    mode: str = "output",
    layers: Sequence[int] | None = None,
    keep_last: int = 16,
    n_last: int = 4,
    sensitivity: torch.Tensor | None = None,
):
    """Measure head sensitivity on ``calibration``, then modulate the chosen heads (module docstring).

    Args:
        calibration: token-id prompts longer than ``keep_last + 1`` tokens (from a dev split).
        alpha: the most sensitive head's multiplier, finite and >= 0 (1 changes nothing).
        per_layer: heads chosen per layer, in [1, H]. mode: "output" or "attention".
        layers: layers to modulate (default all). keep_last, n_last: see :func:`head_sensitivity`.
        sensitivity: a (L, H) result of :func:`head_sensitivity` to reuse; then ``calibration`` is unused.
        tokenizer: unused (the registry's common signature).

    Returns:
        The handle (an ``Attachment`` for "output", a ``QueryScale`` for "attention") with
        ``sensitivity`` (L, H) and ``scales`` {(layer, head): s} set on it; ``detach()`` restores the model.
    """
    from ..hf.attach import attach  # lazy: hf.attach imports this package's base

    n_layers, n_heads = model_shape(model)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0; got {alpha=!r}")
    if isinstance(per_layer, bool) or not isinstance(per_layer, int) or not 1 <= per_layer <= n_heads:
        raise ValueError(f"per_layer must be an int in [1, {n_heads}]; got {per_layer=!r}")
    if mode not in ("output", "attention"):
        raise ValueError(f"mode must be 'output' or 'attention'; got {mode=!r}")
    if layers is not None:
        layers = list(layers)
        if not layers or any(isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < n_layers for l in layers):
            raise ValueError(f"layers must be a non-empty list of layer indices in [0, {n_layers}); got {layers=}")
    if sensitivity is None:
        if isinstance(calibration, (str, bytes)) or not calibration:
            raise ValueError("calibration must be a non-empty list of token-id prompts (head sensitivity is measured on it)")
        sensitivity = head_sensitivity(model, calibration, keep_last=keep_last, n_last=n_last)
    elif not isinstance(sensitivity, torch.Tensor) or tuple(sensitivity.shape) != (n_layers, n_heads):
        raise ValueError(f"sensitivity must be a ({n_layers}, {n_heads}) tensor; got {type(sensitivity)=}")
    scales = modulation_scales(sensitivity, alpha=float(alpha), per_layer=per_layer, layers=layers)
    if mode == "output":
        handle = attach(model, modifiers=[HeadScale(scales)])
    else:
        handle = QueryScale(model, _per_head_factor(scales, n_heads), sorted({layer for layer, _ in scales}))
    handle.sensitivity, handle.scales = sensitivity, scales
    return handle


def _per_head_factor(scales: dict[tuple[int, int], float], n_heads: int):
    """QueryScale factor: a constant (H,) vector per layer, 1.0 for heads not in ``scales``."""
    vectors: dict[int, torch.Tensor] = {}
    for (layer, head), s in scales.items():
        vectors.setdefault(layer, torch.ones(n_heads))[head] = s

    def factor(layer: int, q: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return vectors[layer].to(q.device, q.dtype)  # (H,) broadcasts over (B, N, H)

    return factor
