"""Block-sparse attention: a boolean layout over (query block, key block) tiles.

``layout[r, c]`` says whether queries in block r (positions ``r*block_size ...``) may attend keys in
block c; within an allowed tile every pair is allowed. The layout must have exactly
``ceil(Nq / block_size)`` rows and ``ceil(Nk / block_size)`` columns (the last blocks may be short).
A kernel's tiles need not match ``block_size``: ``block_layout`` re-tiles exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from ._args import check_int
from .base import BlockLayout, Pattern, on_device_of
from .intervals import print_mask


@dataclass(frozen=True)
class BlockSparse(Pattern):
    # The layout as packed bytes plus its shape: hashing and comparing stay cheap for big layouts.
    packed: bytes
    layout_shape: Tuple[int, int]
    block_size: int

    @property
    def layout(self) -> torch.Tensor:
        """bool (Qb, Kb)."""
        return torch.frombuffer(bytearray(self.packed), dtype=torch.bool).view(self.layout_shape)

    def _check(self, n_q: int, n_kv: int) -> None:
        need = (-(-n_q // self.block_size), -(-n_kv // self.block_size))
        if need != self.layout_shape:
            raise ValueError(
                f"block_sparse layout has shape {self.layout_shape}, but n_q={n_q}, n_kv={n_kv} with "
                f"block_size={self.block_size} need {need}"
            )

    def mask_mod(self, n_q, n_kv, device=None):
        self._check(n_q, n_kv)
        layout, bs = self.layout.to(device), self.block_size
        return lambda b, h, q, k: on_device_of(layout, q)[q // bs, k // bs]

    def block_layout(self, n_q, n_kv, q_block=128, kv_block=128):
        self._check(n_q, n_kv)
        bs = self.block_size
        # A kernel tile overlaps a rectangle of layout cells; it is touched if any of them is set
        # and full if all are. 2-D prefix sums count set cells per rectangle.
        counts = torch.zeros(self.layout_shape[0] + 1, self.layout_shape[1] + 1, dtype=torch.long)
        counts[1:, 1:] = self.layout.long().cumsum(0).cumsum(1)
        r0 = torch.arange(0, n_q, q_block) // bs
        r1 = (torch.clamp(torch.arange(0, n_q, q_block) + q_block, max=n_q) - 1) // bs + 1
        c0 = torch.arange(0, n_kv, kv_block) // bs
        c1 = (torch.clamp(torch.arange(0, n_kv, kv_block) + kv_block, max=n_kv) - 1) // bs + 1
        r0, r1, c0, c1 = r0[:, None], r1[:, None], c0[None, :], c1[None, :]
        set_cells = counts[r1, c1] - counts[r0, c1] - counts[r1, c0] + counts[r0, c0]
        touched = set_cells > 0
        full = set_cells == (r1 - r0) * (c1 - c0)
        return BlockLayout(full, touched & ~full, q_block, kv_block)

    def density(self, n_q, n_kv):
        self._check(n_q, n_kv)
        bs = self.block_size
        rows = torch.clamp(n_q - torch.arange(self.layout_shape[0]) * bs, max=bs)
        cols = torch.clamp(n_kv - torch.arange(self.layout_shape[1]) * bs, max=bs)
        allowed = (self.layout.double() * rows[:, None] * cols[None, :]).sum()
        return float(allowed) / (n_q * n_kv)

    def __repr__(self):
        qb, kb = self.layout_shape
        return f"block_sparse(<{qb}x{kb} layout, {int(self.layout.sum())} set>, block_size={self.block_size})"


def block_sparse(layout, block_size: int) -> BlockSparse:
    """Attention allowed on whole (query block, key block) tiles where ``layout`` is True.

    Args:
        layout: bool (Qb, Kb) tensor or nested lists; Qb = ceil(Nq / block_size), Kb = ceil(Nk / block_size).
        block_size: tokens per block along both axes, >= 1.
    """
    check_int("block_size", block_size, 1)
    layout = torch.as_tensor(layout)
    if layout.dim() != 2 or layout.dtype != torch.bool or 0 in layout.shape:
        raise ValueError(
            f"`layout` must be a non-empty 2-D bool tensor (Qb, Kb); got shape={tuple(layout.shape)}, "
            f"dtype={layout.dtype}"
        )
    packed = layout.detach().cpu().contiguous().numpy().tobytes()
    return BlockSparse(packed, tuple(layout.shape), block_size)


def main() -> None:
    print_mask(block_sparse([[True, False, False], [True, True, False], [False, True, True]], 4), 12, 10)


if __name__ == "__main__":
    main()


def random_causal_layout(n_blocks: int, density: float, heads: int = 1, *, seed: int = 1,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """A synthetic SeerAttention-like layout, for benchmarks and tests of block-sparse kernels.

    Returns (heads, n_blocks, n_blocks) bool: row r keeps its diagonal block and ``ceil(density * (r + 1))``
    causal blocks in all (at least 1), the others chosen at random, so every row holds ``density`` of its
    causal blocks, the way a per-row top-k gate would. The same seed and device give the same layout.
    """
    check_int("n_blocks", n_blocks, 1)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density=}")
    check_int("heads", heads, 1)
    g = torch.Generator(device=device or "cpu").manual_seed(seed)
    score = torch.rand(heads, n_blocks, n_blocks, device=device, generator=g)
    i = torch.arange(n_blocks, device=device)
    causal = i[:, None] >= i[None, :]
    score = score.masked_fill(~causal, -1.0)
    score[:, i, i] = 2.0  # the diagonal ranks first
    keep = torch.ceil(density * (i + 1).float()).long().clamp(min=1)
    rank = score.argsort(-1, descending=True).argsort(-1)
    return (rank < keep[None, :, None]) & causal
