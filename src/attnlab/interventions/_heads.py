"""Naming heads: ``(layer, head)`` pairs of query heads, checked against a model's shape."""
from __future__ import annotations

from typing import Iterable

import torch


def model_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(number of attention layers, query heads per layer) of a transformers model."""
    from ..hf.attach import attention_layers  # lazy: hf.attach imports this package's base

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_heads = getattr(config, "num_attention_heads", None)
    if not isinstance(n_heads, int):
        raise ValueError(f"cannot tell the number of heads of {type(model).__name__}: no config.num_attention_heads")
    return len(attention_layers(model)), n_heads


def check_heads(heads: Iterable, n_layers: int, n_heads: int, arg: str = "heads") -> tuple[tuple[int, int], ...]:
    """Validate ``(layer, head)`` pairs; returns them sorted and de-duplicated.

    Raises:
        ValueError: not an iterable of int pairs, an empty selection, or a layer/head out of range.
    """
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Iterable):
        raise ValueError(f"`{arg}` must be an iterable of (layer, head) pairs; got {type(heads)=}")
    out = set()
    for pair in heads:
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                or any(isinstance(x, bool) or not isinstance(x, int) for x in pair)):
            raise ValueError(f"`{arg}` must hold (layer, head) int pairs; got {pair!r}")
        layer, head = pair
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer out of range in `{arg}`: {layer=} but the model has {n_layers} attention layers")
        if not 0 <= head < n_heads:
            raise ValueError(f"head out of range in `{arg}`: {head=} but each layer has {n_heads} query heads")
        out.add((layer, head))
    if not out:
        raise ValueError(f"`{arg}` names no head; pass at least one (layer, head) pair")
    return tuple(sorted(out))


def by_layer(heads: Iterable[tuple[int, int]]) -> dict[int, tuple[int, ...]]:
    """{layer: sorted heads} of (layer, head) pairs."""
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        out.setdefault(layer, []).append(head)
    return {layer: tuple(sorted(hs)) for layer, hs in sorted(out.items())}


def all_heads(n_layers: int, n_heads: int, layers: Iterable[int] | None = None) -> tuple[tuple[int, int], ...]:
    """Every (layer, head) pair, optionally only of ``layers``."""
    chosen = range(n_layers) if layers is None else layers
    return tuple((layer, head) for layer in chosen for head in range(n_heads))
