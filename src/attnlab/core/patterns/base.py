"""The mask language: a Pattern says which keys each query may attend to.

A Pattern is a small frozen dataclass (hashable, so kernels can cache compiled work per pattern)
that gives four views of one rule:

- ``mask_mod(n_q, n_kv, device=None)``: a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool``
  closure, built only from tensor ops so it traces under torch.compile and broadcasts over index
  tensors; tensors it captures (lookup tables) are placed on ``device``;
- ``mask(n_q, n_kv)``: the dense boolean (Nq, Nk) mask, for tests and the float64 reference;
- ``block_layout(n_q, n_kv, q_block, kv_block)``: which (query block, key block) tiles are full,
  partial or empty, derived from the pattern's geometry rather than from an N x N evaluation;
- ``density(n_q, n_kv)``: the fraction of allowed (query, key) pairs.

Patterns compose with ``&``, ``|`` and ``~``. Multi-dimensional patterns (neighborhoods, blocked) also
give a token permutation that makes them block-sparse; kernels use it as::

    order = p.token_order(n, n)          # (N,) int64, or None: run p as it is
    pp = p.permuted()                    # the same rule in permuted coordinates
    out = run(q[:, :, order], k[:, :, order], v[:, :, order], pattern=pp)
    out = out[:, :, inverse_permutation(order)]

 Cross attention (Nq != Nk) aligns queries to the *end* of
the keys (bottom-right, as FlashAttention >= 2.1 does): query i sits at key position
``i + (Nk - Nq)``. Positional patterns (causal, windows) use that aligned position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Rows of the mask evaluated at once by the generic (non-analytic) fallbacks: O(CHUNK * Nk) memory.
CHUNK = 1024


@dataclass(frozen=True)
class BlockLayout:
    """Tile map of a pattern: ``full[i, j]`` (every pair allowed) and ``partial[i, j]`` (some allowed).

    Both are bool (ceil(Nq / q_block), ceil(Nk / kv_block)); they never overlap.
    """

    full: torch.Tensor
    partial: torch.Tensor
    q_block: int
    kv_block: int

    @property
    def density(self) -> float:
        """Fraction of tiles a kernel must visit (full or partial)."""
        return (self.full | self.partial).float().mean().item()


def _blocks_from_mask_rows(pattern: "Pattern", n_q: int, n_kv: int, q_block: int, kv_block: int) -> BlockLayout:
    """Generic layout: evaluate the mask CHUNK rows at a time and pool it to tiles (O(Nq * Nk) work)."""
    qb, kb = -(-n_q // q_block), -(-n_kv // kv_block)
    any_ = torch.zeros(qb, kb, dtype=torch.bool)
    all_ = torch.ones(qb, kb, dtype=torch.bool)
    step = max(q_block, (CHUNK // q_block) * q_block)
    for start in range(0, n_q, step):
        rows = _mask_rows(pattern, start, min(start + step, n_q), n_q, n_kv)
        pad_q = -rows.shape[0] % q_block
        pad_k = -n_kv % kv_block
        # Padding counts as "allowed" for all() and "not allowed" for any(): edges stay exact.
        r_any = torch.nn.functional.pad(rows, (0, pad_k, 0, pad_q), value=False)
        r_all = torch.nn.functional.pad(rows, (0, pad_k, 0, pad_q), value=True)
        shape = (-1, q_block, kb, kv_block)
        i = start // q_block
        n = r_any.shape[0] // q_block
        any_[i : i + n] = r_any.view(shape).any(3).any(1)
        all_[i : i + n] = r_all.view(shape).all(3).all(1)
    return BlockLayout(full=all_ & any_, partial=any_ & ~all_, q_block=q_block, kv_block=kv_block)


def _mask_rows(pattern: "Pattern", start: int, stop: int, n_q: int, n_kv: int, device=None) -> torch.Tensor:
    fn = pattern.mask_mod(n_q, n_kv, device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    q_idx = torch.arange(start, stop, device=device).view(-1, 1)
    kv_idx = torch.arange(n_kv, device=device).view(1, -1)
    return fn(zero, zero, q_idx, kv_idx).expand(stop - start, n_kv)


def on_device_of(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """A captured lookup table on the device of the index tensor (for callers that gave no device)."""
    return table if table.device == idx.device else table.to(idx.device)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """The inverse of a permutation (N,): ``x[order][inverse_permutation(order)] == x``."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
    return inv


class Pattern:
    """Base class. Subclasses implement ``mask_mod``; they override ``block_layout`` and ``density``
    with closed forms from their geometry (the generic versions here cost O(Nq * Nk) time)."""

    def mask_mod(self, n_q: int, n_kv: int, device=None) -> MaskMod:
        """The rule as ``(b, h, q_idx, kv_idx) -> bool`` over broadcastable int64 index tensors."""
        raise NotImplementedError

    def mask(self, n_q: int, n_kv: int, device=None) -> torch.Tensor:
        """Dense bool (Nq, Nk); True where query i may attend key j."""
        return _mask_rows(self, 0, n_q, n_q, n_kv, device).clone()

    def block_layout(self, n_q: int, n_kv: int, q_block: int = 128, kv_block: int = 128) -> BlockLayout:
        return _blocks_from_mask_rows(self, n_q, n_kv, q_block, kv_block)

    def density(self, n_q: int, n_kv: int) -> float:
        allowed = 0
        for start in range(0, n_q, CHUNK):
            allowed += int(_mask_rows(self, start, min(start + CHUNK, n_q), n_q, n_kv).sum())
        return allowed / (n_q * n_kv)

    def token_order(self, n_q: int, n_kv: int) -> torch.Tensor | None:
        """A permutation of token positions that makes the pattern block-sparse, or None.

        ``order[p]`` is the original position of the token placed at position p. Kernels run
        attention on ``x[:, :, order]`` with ``self.permuted()`` and undo the order on the output
        with ``inverse_permutation(order)``. Multi-dimensional patterns return a tile order here.
        """
        return None

    def permuted(self) -> "Pattern":
        """This pattern in the coordinates of ``token_order`` (itself when token_order is None)."""
        return self

    def __and__(self, other: "Pattern") -> "Pattern":
        return And(self, other)

    def __or__(self, other: "Pattern") -> "Pattern":
        return Or(self, other)

    def __invert__(self) -> "Pattern":
        return Not(self)


@dataclass(frozen=True)
class And(Pattern):
    a: Pattern
    b: Pattern

    def mask_mod(self, n_q, n_kv, device=None):
        fa, fb = self.a.mask_mod(n_q, n_kv, device), self.b.mask_mod(n_q, n_kv, device)
        return lambda b, h, q, k: fa(b, h, q, k) & fb(b, h, q, k)

    def block_layout(self, n_q, n_kv, q_block=128, kv_block=128):
        la = self.a.block_layout(n_q, n_kv, q_block, kv_block)
        lb = self.b.block_layout(n_q, n_kv, q_block, kv_block)
        full = la.full & lb.full
        # Conservative: a tile touched by both may still be empty; the kernel then masks it.
        touched = (la.full | la.partial) & (lb.full | lb.partial)
        return BlockLayout(full, touched & ~full, q_block, kv_block)

    def __repr__(self):
        return f"({self.a!r} & {self.b!r})"


@dataclass(frozen=True)
class Or(Pattern):
    a: Pattern
    b: Pattern

    def mask_mod(self, n_q, n_kv, device=None):
        fa, fb = self.a.mask_mod(n_q, n_kv, device), self.b.mask_mod(n_q, n_kv, device)
        return lambda b, h, q, k: fa(b, h, q, k) | fb(b, h, q, k)

    def block_layout(self, n_q, n_kv, q_block=128, kv_block=128):
        la = self.a.block_layout(n_q, n_kv, q_block, kv_block)
        lb = self.b.block_layout(n_q, n_kv, q_block, kv_block)
        full = la.full | lb.full
        touched = la.full | la.partial | lb.full | lb.partial
        return BlockLayout(full, touched & ~full, q_block, kv_block)

    def __repr__(self):
        return f"({self.a!r} | {self.b!r})"


@dataclass(frozen=True)
class Not(Pattern):
    """``~a``: the pairs ``a`` forbids. Its tiles swap full and empty; partial stays partial."""

    a: Pattern

    def mask_mod(self, n_q, n_kv, device=None):
        fa = self.a.mask_mod(n_q, n_kv, device)
        return lambda b, h, q, k: ~fa(b, h, q, k)

    def block_layout(self, n_q, n_kv, q_block=128, kv_block=128):
        la = self.a.block_layout(n_q, n_kv, q_block, kv_block)
        # Safe when a's layout is conservative: a's full tiles are truly full, so never touched here.
        return BlockLayout(~(la.full | la.partial), la.partial, q_block, kv_block)

    def density(self, n_q, n_kv):
        return 1.0 - self.a.density(n_q, n_kv)

    def __repr__(self):
        return f"~{self.a!r}"
