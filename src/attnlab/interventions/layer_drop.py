"""Attention-layer drop: skip whole attention sub-blocks, the most redundant first.

Paper: "What Matters in Transformers? Not All Attention is Needed" (He et al., arXiv 2406.15786).
Each layer's redundancy is cos(X, X + Attn(Norm(X))) averaged over calibration tokens, measured by
:class:`attnlab.analysis.layer_redundancy.LayerRedundancy`; the ``k`` layers with the highest cosine
are dropped in one shot (the paper's "discrete" drop). A dropped layer's block computes
X + 0 = X: its attention module is never run (no q/k/v projections, no attention, no o_proj), so the
forward really gets faster. ``detach()`` restores the model bit-identically.

Mechanism: the attention module's ``forward`` is shadowed by an instance attribute that returns
zeros; deleting the attribute restores the class's forward. The module tree, weights and
``state_dict`` are untouched. With a KV cache, a dropped layer appends zero keys/values of the right
shape, so every layer's cache length (which transformers reads for positions) stays the same; nothing
ever reads them.

Supports pre-norm decoders (Llama, Mistral, Qwen, SmolLM2: ``block.self_attn``); the paper's setting.
"""
from __future__ import annotations

import random
from typing import Sequence

import torch


PAPER = "What Matters in Transformers? Not All Attention is Needed"


def _skipped_attention(module: torch.nn.Module):
    """A forward for ``module`` that returns zeros (B, N, D) and keeps a cache's length in step."""

    def forward(hidden_states: torch.Tensor, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            b, n = hidden_states.shape[:2]
            n_kv = module.config.num_key_value_heads
            zeros = hidden_states.new_zeros(b, n_kv, n, module.head_dim)  # (B, H_kv, N, D)
            cache.update(zeros, zeros, module.layer_idx)
        return torch.zeros_like(hidden_states), None

    return forward


class LayerDrop:
    """Handle of dropped attention layers; a context manager. See :func:`drop_attention_layers`.

    Attributes:
        model: the model. layers: the dropped layer indices, in the order given.
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[int]) -> None:
        self.model = model
        self.layers = tuple(layers)
        self._modules: list[torch.nn.Module] = []

    def _enable(self) -> None:
        from ..analysis._modules import find_blocks  # lazy: attnlab.analysis imports hf.attach, which imports us

        blocks = find_blocks(self.model)
        for layer in self.layers:
            attn = blocks[layer].self_attn
            if "forward" in attn.__dict__:
                self.detach()
                raise ValueError(f"attention layer {layer} is already dropped or patched; detach that first ({layer=})")
            attn.forward = _skipped_attention(attn)
            self._modules.append(attn)

    def detach(self) -> None:
        """Restore every dropped layer (idempotent)."""
        for attn in self._modules:
            attn.__dict__.pop("forward", None)
        self._modules = []

    @property
    def active(self) -> bool:
        return bool(self._modules)

    def __enter__(self) -> "LayerDrop":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        return f"LayerDrop({type(self.model).__name__}, layers={list(self.layers)}, active={self.active})"


def drop_attention_layers(model: torch.nn.Module, layers: Sequence[int]) -> LayerDrop:
    """Skip the attention sub-block of each layer in ``layers`` (block output = input + MLP part only).

    Args:
        model: a transformers model with pre-norm decoder blocks (``self_attn``).
        layers: distinct layer indices in ``[0, n_layers)``; may be empty (then nothing changes).

    Returns:
        An active :class:`LayerDrop`; ``detach()`` or leave its ``with`` block to restore.
    """
    from ..analysis._modules import block_kind, find_blocks  # lazy (see LayerDrop._enable)

    blocks = find_blocks(model)
    kind = block_kind(blocks[0])
    if kind != "prenorm":
        raise ValueError(f"layer drop supports pre-norm decoder blocks (self_attn), got a {kind!r} block in {type(model).__name__}")
    given = layers
    try:
        layers = None if isinstance(layers, (str, bytes)) else list(layers)
    except TypeError:
        layers = None
    if layers is None or any(isinstance(l, bool) or not isinstance(l, int) for l in layers):
        raise ValueError(f"layers must be a sequence of int layer indices, got {type(given)=}, {given=}")
    bad = [l for l in layers if not 0 <= l < len(blocks)]
    if bad:
        raise ValueError(f"layer out of range [0, {len(blocks)}): {bad}; got {layers=}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct, got {layers=}")
    handle = LayerDrop(model, layers)
    handle._enable()
    return handle


def redundancy_order(model: torch.nn.Module, calibration: Sequence[Sequence[int]]) -> list[int]:
    """Layers from most to least redundant: highest mean cos(X, X + Attn) on ``calibration`` first.

    Args:
        calibration: token-id prompts; each is run once (batch 1, no cache).
    """
    from ..analysis.layer_redundancy import LayerRedundancy  # lazy (see LayerDrop._enable)

    _check_calibration(calibration)
    device = next(model.parameters()).device
    with LayerRedundancy(model) as probe, torch.no_grad():
        for ids in calibration:
            model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
    return probe.result()["drop_order"]


def choose_layers(
    model: torch.nn.Module,
    calibration: Sequence[Sequence[int]],
    k: int,
    *,
    order: str = "similarity",
    seed: int = 0,
) -> list[int]:
    """The ``k`` layers to drop: most redundant on ``calibration`` (``order="similarity"``) or a seeded
    random choice (``order="random"``, the paper's baseline; ``calibration`` is then unused)."""
    from ..analysis._modules import find_blocks  # lazy (see LayerDrop._enable)

    n = len(find_blocks(model))
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, {n}], got {k=}")
    if order == "similarity":
        return redundancy_order(model, calibration)[:k]
    if order == "random":
        return random.Random(seed).sample(range(n), k)
    raise ValueError(f"order must be 'similarity' or 'random', got {order=}")


def apply(model, tokenizer, calibration, *, k: int = 4, order: str = "similarity", seed: int = 0) -> LayerDrop:
    """Registry entry: drop the ``k`` most redundant attention layers measured on ``calibration``."""
    return drop_attention_layers(model, choose_layers(model, calibration, k, order=order, seed=seed))


def _check_calibration(calibration) -> None:
    if isinstance(calibration, (str, bytes)) or not calibration or not all(len(p) > 0 for p in calibration):
        raise ValueError(f"calibration must be a non-empty list of non-empty token-id lists, got {type(calibration)=}")
