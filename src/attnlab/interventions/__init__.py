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
}

__all__ = ["Modifier", "Intervention", "INTERVENTIONS", "HeadScale", "head_mask", "head_scale",
           "InitialTokenScale", "zerotuning"]
