"""TinyTransformer: a small pre-norm transformer whose attention is any registered mechanism.

Built to compare mechanisms on synthetic tasks at equal budget (``attnlab bench quality``), in the
spirit of nanoGPT: one readable file. Token tasks embed ids (``vocab_size``); real-valued tasks
project features (``in_dim``). Each block is ``x + mixer(norm(x))`` then, when ``mlp_ratio > 0``,
``x + mlp(norm(x))``; Zoology's MQAR models use the mixer alone (``mlp_ratio=0``).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .mechanisms import MECHANISMS

POSITIONS = ("learned", "sinusoidal", "none")


def make_mechanism(name: str, d_model: int, n_heads: int, causal: bool, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The registered mechanism ``name`` as a module (d_model, n_heads, causal=..., **kwargs)."""
    if name not in MECHANISMS:
        raise ValueError(f"`mechanism` must be one of {sorted(MECHANISMS)}; got mechanism={name!r}")
    return MECHANISMS[name](d_model, n_heads, causal=causal, **(kwargs or {}))


def sinusoidal(n: int, d: int) -> Tensor:
    """The fixed sin/cos position table of "Attention Is All You Need": (n, d)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(n, d)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return table


class Block(nn.Module):
    """Pre-norm residual block: mixer, then an optional MLP. x (B, N, d_model) -> (B, N, d_model)."""

    def __init__(self, mixer: nn.Module, d_model: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.mixer = nn.LayerNorm(d_model), mixer
        self.mlp = None
        if mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(d_model)
            self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.mixer(self.norm1(x)))
        if self.mlp is not None:
            x = x + self.drop(self.mlp(self.norm2(x)))
        return x


class TinyTransformer(nn.Module):
    """A small transformer over token ids or real features, with attention from ``attnlab.mechanisms``.

    Args:
        mechanism: a name in ``attnlab.mechanisms.MECHANISMS`` (e.g. "softmax").
        vocab_size: token ids in [0, vocab_size) are embedded (token tasks); or
        in_dim: features (B, N, in_dim) are projected (real-valued tasks). Exactly one of the two.
        out_dim: outputs per position (default: vocab_size for tokens, 1 for features).
        d_model: width. n_layers: blocks. n_heads: heads per mechanism.
        causal: passed to every mechanism (position i then depends on positions <= i only).
        max_len: longest sequence the position table covers.
        pos: "learned" (Zoology), "sinusoidal" (fixed; runs past training lengths) or "none"
            (papers 6 and 34 use no positional encoding).
        mlp_ratio: MLP width / d_model; 0 drops the MLP (attention-only, as Zoology's MQAR models).
        dropout: after each residual branch.
        mechanism_kwargs: extra keyword arguments for the mechanism (its paper's hyperparameters).
        short_conv: kernel size of a causal convolution (full d_model x d_model) over the embedded sequence before the
            first block (0: none). Kernel 2 hands each token its predecessor, so recall needs no
            previous-token head; short convolutions precede the mixer in Zoology's BaseConv/Based
            models. Applied alike to every mechanism, it removes the long induction-head plateau
            of 2-layer attention (minutes of CPU training instead of hours) without adding recall
            capacity of its own.
        tie_embeddings: share the token embedding with the output head (token tasks with
            out_dim == vocab_size); copying a token's embedding then directly raises its logit,
            which makes recall tasks train much faster.

    Shapes: inputs (B, N) int64 or (B, N, in_dim) float -> (B, N, out_dim).
    """

    def __init__(
        self,
        mechanism: str = "softmax",
        *,
        vocab_size: int | None = None,
        in_dim: int | None = None,
        out_dim: int | None = None,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 1,
        causal: bool = False,
        max_len: int = 512,
        pos: str = "learned",
        mlp_ratio: int = 0,
        dropout: float = 0.0,
        mechanism_kwargs: dict[str, Any] | None = None,
        tie_embeddings: bool = False,
        short_conv: int = 0,
    ) -> None:
        super().__init__()
        if (vocab_size is None) == (in_dim is None):
            raise ValueError(f"give exactly one of `vocab_size` (tokens) and `in_dim` (features); got {vocab_size=}, {in_dim=}")
        if pos not in POSITIONS:
            raise ValueError(f"`pos` must be one of {POSITIONS}; got {pos=}")
        for name, value in dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, max_len=max_len).items():
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1; got {name}={value}")
        out_dim = out_dim or (vocab_size if vocab_size is not None else 1)
        if tie_embeddings and (vocab_size is None or out_dim != vocab_size):
            raise ValueError(f"`tie_embeddings` needs token inputs with out_dim == vocab_size; got {vocab_size=}, {out_dim=}")
        # Everything needed to rebuild the model from a checkpoint.
        self.config = dict(mechanism=mechanism, vocab_size=vocab_size, in_dim=in_dim, out_dim=out_dim, d_model=d_model,
                           n_layers=n_layers, n_heads=n_heads, causal=causal, max_len=max_len, pos=pos,
                           mlp_ratio=mlp_ratio, dropout=dropout, mechanism_kwargs=dict(mechanism_kwargs or {}),
                           tie_embeddings=tie_embeddings, short_conv=short_conv)
        self.embed = nn.Embedding(vocab_size, d_model) if vocab_size is not None else nn.Linear(in_dim, d_model)
        self.pos = nn.Embedding(max_len, d_model) if pos == "learned" else None
        self.conv = nn.Conv1d(d_model, d_model, short_conv, padding=short_conv - 1, bias=False) if short_conv else None
        if pos == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal(max_len, d_model), persistent=False)
        self.blocks = nn.ModuleList(
            Block(make_mechanism(mechanism, d_model, n_heads, causal, mechanism_kwargs), d_model, mlp_ratio, dropout)
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, out_dim)
        for table in (self.embed, self.pos):
            if isinstance(table, nn.Embedding):  # GPT-2's init: unit-variance tables give huge tied logits
                nn.init.normal_(table.weight, std=0.02)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, inputs: Tensor) -> Tensor:
        n = inputs.shape[1]
        if n > self.config["max_len"]:
            raise ValueError(f"sequence length {n} exceeds max_len={self.config['max_len']}")
        x = self.embed(inputs)  # (B, N, d_model)
        if self.pos is not None:
            x = x + self.pos.weight[:n]
        elif self.config["pos"] == "sinusoidal":
            x = x + self.pos_table[:n]
        if self.conv is not None:  # causal: keep the first N outputs of the left-and-right padded conv
            x = x + self.conv(x.transpose(1, 2))[..., :n].transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # (B, N, out_dim)

    def n_params(self, mixer_only: bool = False) -> int:
        """Parameter count (of the attention mixers alone when ``mixer_only``)."""
        params = (p for b in self.blocks for p in b.mixer.parameters()) if mixer_only else self.parameters()
        return sum(p.numel() for p in params)


def for_task(task, mechanism: str = "softmax", **kwargs: Any) -> TinyTransformer:
    """A TinyTransformer shaped for a synthetic task (its vocabulary or feature size, causality, length).

    ``kwargs`` override TinyTransformer's arguments (d_model, n_layers, ...).
    """
    shape = dict(vocab_size=task.vocab_size, in_dim=task.in_dim, out_dim=task.n_classes, causal=task.causal,
                 max_len=task.seq_len)
    return TinyTransformer(mechanism, **{**shape, **kwargs})
