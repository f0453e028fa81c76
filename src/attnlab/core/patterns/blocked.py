"""Blocked local attention with a halo (HaloNet) on 1-D, 2-D and 3-D token grids.

From "Scaling Local Self-Attention for Parameter Efficient Visual Backbones" (Vaswani et al., 2021,
arXiv 2103.12731). The grid is cut into non-overlapping blocks of ``block`` cells per axis; all
queries of a block attend to the same keys: the block grown by ``halo`` cells on each side.

At the grid borders the paper zero-pads the image so that every block sees (b + 2h)^d positions;
padded positions carry no content, so here the halo is clipped to the grid instead (border blocks
see fewer keys). The last block on an axis may be short when ``block`` does not divide the grid.
Grid patterns are self-attention: Nq == Nk == prod(shape).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from ._args import check_shape, per_axis
from .grid import GridPattern, maximum, minimum
from .intervals import print_mask


@dataclass(frozen=True)
class Blocked(GridPattern):
    shape: Tuple[int, ...]
    block: Tuple[int, ...]
    halo: Tuple[int, ...]
    tile_shape: Tuple[int, ...] | None = None

    def _window(self, axis, c, n):
        b, h = self.block[axis], self.halo[axis]
        first = (c // b) * b
        return maximum(first - h, 0), minimum(first + (b - 1 + h), n - 1)

    def __repr__(self):
        def one(values):
            return values[0] if len(set(values)) == 1 else values

        tile = "" if self.tile_shape is None else f", tile_shape={self.tile_shape!r}"
        return f"blocked({self.shape!r}, block={one(self.block)!r}, halo={one(self.halo)!r}{tile})"


def blocked(shape, block, halo=0, *, tile_shape=None) -> Blocked:
    """HaloNet blocked attention: each block of queries sees its block plus ``halo`` cells around it.

    Parameters:
        shape: the grid, 1 to 3 ints; tokens are its cells in row-major order (N = prod(shape)).
        block: block size per axis (int or tuple), 1 <= block <= shape.
        halo: extra key cells on each side per axis (int or tuple), >= 0.

    Other Parameters:
        tile_shape: tile of the token order (``token_order`` / ``permuted``); None picks a tile of
            128 tokens (128, 8x16, 4x4x8) clipped to the grid.
    """
    shape = check_shape(shape)
    ndim = len(shape)
    block = per_axis("block", block, ndim, 1)
    halo = per_axis("halo", halo, ndim, 0)
    if any(b > n for b, n in zip(block, shape)):
        raise ValueError(f"`block` must be <= the grid on every axis; got {block=}, {shape=}")
    if tile_shape is not None:
        tile_shape = per_axis("tile_shape", tile_shape, ndim, 1)
    return Blocked(shape, block, halo, tile_shape)


def main() -> None:
    print_mask(blocked(12, 4, 1), 12, 12)
    print_mask(blocked((4, 4), 2, 1), 16, 16)


if __name__ == "__main__":
    main()
