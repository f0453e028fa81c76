"""The modifier contract: a training-free change to one attention call.

A modifier may add a logit bias, change the scores before the softmax, the probabilities after it,
or the per-head output, for the layers and heads it names. What each hook costs:

* ``score_bias``: an additive bias broadcastable to (B, Hq, Nq, Nk), folded into the float mask that
  SDPA receives, so fused kernels keep running (the exact chunked path adds it to the scores);
* ``modify_output``: applied to SDPA's per-head output, fused kernels keep running;
* ``modify_scores`` / ``modify_probs``: the exact chunked path, for the layers in ``layers`` only.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..probes.base import CallContext


class RankOneBias(NamedTuple):
    """A logit bias ``row * col``: bias[b, h, i, j] = row[b, h, i, 0] * col[b, h, 0, j].

    Returned by ``score_bias`` when a bias factorises (e.g. a per-row factor on a set of columns); attach
    then runs it as one extra query/key dimension on the fused causal kernel, with no (Nq, Nk) mask.
    Shapes: row (B|1, Hq|1, Nq, 1), col (B|1, Hq|1, 1, Nk).
    """

    row: torch.Tensor
    col: torch.Tensor

    def dense(self) -> torch.Tensor:
        """(B|1, Hq|1, Nq, Nk) the bias itself."""
        return self.row * self.col


class Modifier:
    """Base class. Override any of the hooks; each returns its input unchanged by default.

    Shapes: scores/probs (B, Hq, C, Nk) for query rows ``q_start : q_start + C``;
    output (B, Hq, Nq, Dv) per-head attention output before the output projection.

    ``layers``: the layers this modifier acts on (a set of ints), or None for all of them. A layer
    outside every prob/score modifier's ``layers`` keeps SDPA (unless observers are attached).
    Modifiers must still check ``ctx.layer`` themselves: every hook is called on every layer.
    """

    #: set True in subclasses that override modify_scores / modify_probs (forces the chunked path)
    needs_probs: bool = False
    #: layers acted on (None: all); see the class docstring
    layers: frozenset[int] | None = None

    def score_bias(self, ctx: CallContext) -> "torch.Tensor | RankOneBias | None":
        """An additive logit bias for this call, broadcastable to (B, Hq, Nq, Nk), or None (no bias).

        Must be 4-D, e.g. (1, Hq, 1, Nk) for a per-head column bias, or a :class:`RankOneBias`. Column
        biases (Nq dim 1) and rank-one biases keep the fused causal kernel (one extra q/k dimension);
        other biases are folded into a float (Nq, Nk) mask. Masked keys stay masked whatever
        the bias. While this hook runs, ``ctx.extra["query"]`` (B, Hq, Nq, D), ``ctx.extra["key"]``
        (B, Hkv, Nk, D) and ``ctx.extra["value"]`` (B, Hkv, Nk, Dv) hold the call's (rotated) queries and
        keys and its values, for biases that depend on the input.
        """
        return None

    def modify_scores(self, ctx: CallContext, q_start: int, scores: torch.Tensor) -> torch.Tensor:
        return scores

    def modify_probs(self, ctx: CallContext, q_start: int, probs: torch.Tensor) -> torch.Tensor:
        return probs

    def modify_output(self, ctx: CallContext, output: torch.Tensor) -> torch.Tensor:
        return output
