"""The modifier contract: a training-free change to one attention call.

A modifier may change the scores before the softmax, the probabilities after it, or the
per-head output, for the layers and heads it names. A modifier that overrides ``modify_scores`` or
``modify_probs`` sends its layers through the exact chunked path; one that only overrides
``modify_output`` keeps SDPA. (Additive logit biases that keep fused kernels are not built yet.)
"""
from __future__ import annotations

import torch

from ..probes.base import CallContext


class Modifier:
    """Base class. Override any of the hooks; each returns its input unchanged by default.

    Shapes: scores/probs (B, Hq, C, Nk) for query rows ``q_start : q_start + C``;
    output (B, Hq, Nq, Dv) per-head attention output before the output projection.
    """

    #: set True in subclasses that override modify_scores / modify_probs (forces the chunked path)
    needs_probs: bool = False

    def modify_scores(self, ctx: CallContext, q_start: int, scores: torch.Tensor) -> torch.Tensor:
        return scores

    def modify_probs(self, ctx: CallContext, q_start: int, probs: torch.Tensor) -> torch.Tensor:
        return probs

    def modify_output(self, ctx: CallContext, output: torch.Tensor) -> torch.Tensor:
        return output
