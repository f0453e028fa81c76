"""Training-free interventions: modifiers attached to a model, and the registry that names them.

Each entry of :data:`INTERVENTIONS` has ``apply(model, tokenizer, calibration, **hyper) -> handle``:
``calibration`` is a list of token-id prompts (``list[list[int]]``) from a split that is never reported,
which an intervention may use to choose heads, layers or strengths (or ignore); the handle has
``detach()`` (restores the model bit-identically) and is a context manager. ``grid`` lists the
hyperparameter candidates an evaluation harness chooses among on a development split.
Heads are named as ``(layer, head)`` pairs of query heads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .base import Modifier
from .head_mask import HeadScale, head_mask, head_scale
from .zerotuning import InitialTokenScale, zerotuning
from .act import ACTCalibration, act
from .var import VARRedistribution, var
from . import layer_drop as _layer_drop
from .echoatt import EchoAttention, echoatt
from .head_modulation import head_modulation
from .layer_drop import LayerDrop, drop_attention_layers
from .selective_temperature import QueryScale, selective_temperature


@dataclass(frozen=True)
class Intervention:
    """One registry entry (see the module docstring)."""

    apply: Callable[..., Any]  # apply(model, tokenizer, calibration, **hyper) -> handle with .detach()
    grid: tuple[dict, ...]  # hyperparameter candidates; the harness picks one on a dev split
    paper: str  # paper title ("" for plain primitives)
    description: str


INTERVENTIONS: dict[str, Intervention] = {
    "head_mask": Intervention(
        apply=head_mask, grid=({},), paper="",
        description="zero the outputs of the named (layer, head) pairs; needs heads=[...]",
    ),
    "head_scale": Intervention(
        apply=head_scale, grid=({},), paper="",
        description="multiply the outputs of the named (layer, head) pairs by scale (>= 0); needs heads=, scale=",
    ),
    "zerotuning": Intervention(
        apply=zerotuning,
        grid=({}, {"gamma": 1.5}, {"gamma": 2.0}, {"gamma": 0.7}, {"n_heads": 16}, {"heads": "all", "gamma": 1.5}),
        paper="ZeroTuning: Unlocking the Initial Token's Power to Enhance Large Language Models Without Training",
        description="scale the initial token's attention by gamma (a log-gamma logit bias, fused kernels) in heads "
                    "profiled on calibration prompts; gamma searched by calibration entropy unless given",
    ),
    "act": Intervention(
        apply=act,
        grid=({}, {"n_heads": 4}, {"n_heads": 16}, {"beta": 0.6}, {"beta": 0.2}),
        paper="Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models without Training "
              "through Attention Calibration",
        description="per input, detect hidden sinks in chosen heads and move (1 - beta) of their attention to the other "
                    "tokens (exact per-row logit bias, fused kernels); heads chosen on calibration prompts",
    ),
    "var": Intervention(
        apply=var,
        grid=({}, {"n_heads": 8}, {"n_heads": 32}, {"p": 0.8}, {"p": 0.4}),
        paper="See What You Are Told: Visual Attention Sink in Large Multimodal Models",
        description="text form of VAR: sink tokens from massive activations; in content-focused rows of chosen heads, "
                    "(1 - p) of the sink attention goes to the other tokens (exact per-row logit bias)",
    ),
    "head_modulation": Intervention(
        apply=head_modulation,
        grid=({"alpha": 1.5}, {"alpha": 2.0}, {"alpha": 0.5}, {"alpha": 1.5, "per_layer": 2},
              {"alpha": 1.5, "mode": "attention"}),
        paper="Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large Vision-Language Model; "
              "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence",
        description="text form: per-head sensitivity to the prompt's context (output divergence with/without it) on "
                    "calibration prompts; the most sensitive heads per layer scaled (output or logits) by up to alpha",
    ),
    "layer_drop": Intervention(
        apply=_layer_drop.apply, grid=({"k": 1}, {"k": 2}, {"k": 4}),
        paper="What Matters in Transformers? Not All Attention is Needed",
        description="skip the k attention sub-blocks with the highest cos(X, X + Attn) on calibration prompts "
                    "(the attention never runs: faster)",
    ),
    "echoatt": Intervention(
        apply=echoatt,
        grid=({"threshold": 0.75, "max_shared": 2}, {"threshold": 0.7, "max_shared": 4}, {"threshold": 0.7}),
        paper="EchoAtt: Attend, Copy, then Adjust for More Efficient Large Language Models",
        description="training-free: layers whose attention maps match an earlier layer's (measured on calibration "
                    "prompts, heads matched) reuse that layer's probabilities with their own values",
    ),
    "selective_temperature": Intervention(
        apply=selective_temperature,
        grid=({"alpha": 0.05}, {"alpha": 0.15}, {"gamma": 0.3}, {"gamma": -0.3}, {"alpha": 0.05, "gamma": 0.3}),
        paper="Selective Attention: Enhancing Transformer through Principled Context Control",
        description="training-free per-query temperature: logits times (1 + alpha ln(1 + pos / ell)) "
                    "(||q|| / median ||q||)^gamma (query scaling before RoPE, fused kernels)",
    ),
}

__all__ = ["Modifier", "Intervention", "INTERVENTIONS", "HeadScale", "head_mask", "head_scale",
           "InitialTokenScale", "zerotuning", "ACTCalibration", "act", "VARRedistribution", "var",
           "head_modulation", "LayerDrop", "drop_attention_layers", "EchoAttention", "echoatt", "QueryScale",
           "selective_temperature"]
