"""What the synthetic training tasks share: a `Batch` of tensors, the two target kinds and their scorers.

A synthetic task is a small frozen dataclass (its geometry) with
``sample(n, seed) -> Batch`` (seeded: the same ``(n, seed)`` gives the same tensors) and
``score(outputs, batch) -> float``. Token tasks have ``vocab_size`` and integer targets
(``IGNORE`` where nothing is asked), scored by accuracy; real-valued tasks have ``in_dim`` and
float targets (NaN where nothing is asked), scored by mean squared error. ``attnlab.train`` and
``attnlab.models.TinyTransformer`` read these attributes to build a model for the task.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE = -100  # the label of positions without a target (as torch's cross_entropy ignore_index)


@dataclass(frozen=True)
class Batch:
    """One batch of a synthetic task.

    Attributes:
        inputs: (B, N) int64 token ids, or (B, N, in_dim) float32 features.
        targets: (B, N) int64 class ids with ``IGNORE`` where nothing is asked, or (B, N) float32
            values with NaN where nothing is asked.
    """

    inputs: Tensor
    targets: Tensor

    def to(self, device: str | torch.device) -> "Batch":
        return Batch(self.inputs.to(device), self.targets.to(device))


def generator(seed: int) -> torch.Generator:
    """A CPU torch.Generator seeded with ``seed`` (tasks sample on CPU so that seeds mean the same everywhere)."""
    return torch.Generator().manual_seed(check_seed(seed))


def check_seed(seed: int) -> int:
    """``seed`` if it is a non-negative int, else ValueError."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int; got {seed=}")
    return seed


def check_positive(**kwargs: int) -> None:
    """Raise ValueError naming the first argument that is not a positive int."""
    for name, value in kwargs.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive int; got {name}={value!r}")


def token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over asked positions. logits (B, N, C), targets (B, N) int64."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def token_accuracy(logits: Tensor, targets: Tensor) -> float:
    """Fraction of asked positions whose argmax is the target. logits (B, N, C), targets (B, N)."""
    asked = targets != IGNORE
    if not asked.any():
        raise ValueError("`targets` asks nothing: every position is IGNORE")
    return (logits.argmax(-1)[asked] == targets[asked]).float().mean().item()


def value_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error over asked positions. outputs (B, N, 1) or (B, N), targets (B, N) float."""
    asked = ~torch.isnan(targets)
    return (outputs.reshape(targets.shape)[asked].float() - targets[asked]).square().mean()


def value_mse(outputs: Tensor, targets: Tensor) -> float:
    """Mean squared error over asked positions, as a float (lower is better)."""
    if torch.isnan(targets).all():
        raise ValueError("`targets` asks nothing: every position is NaN")
    return value_loss(outputs, targets).item()


class TokenTask:
    """Mixin for tasks over token ids: the model embeds ``vocab_size`` ids and predicts ``n_classes``."""

    in_dim = None
    metric = "accuracy"
    higher_is_better = True

    @property
    def n_classes(self) -> int:
        return self.vocab_size

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return token_loss(outputs, batch.targets)

    def score(self, outputs: Tensor, batch: Batch) -> float:
        return token_accuracy(outputs, batch.targets)


class ValueTask:
    """Mixin for real-valued tasks: the model projects ``in_dim`` features and regresses one value."""

    vocab_size = None
    n_classes = 1
    metric = "mse"
    higher_is_better = False

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return value_loss(outputs, batch.targets)

    def score(self, outputs: Tensor, batch: Batch) -> float:
        return value_mse(outputs, batch.targets)
