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
}

__all__ = ["Modifier", "Intervention", "INTERVENTIONS", "HeadScale", "head_mask", "head_scale",
           "InitialTokenScale", "zerotuning", "ACTCalibration", "act", "VARRedistribution", "var"]
