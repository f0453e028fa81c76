"""Neighborhood attention on 1-D, 2-D and 3-D token grids, with dilation, stride and causal axes.

From "Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the Threadblock
Level" (arXiv 2403.04690) and "Generalized Neighborhood Attention: Multi-dimensional Sparse
Attention at the Speed of Light" (arXiv 2504.16922); the semantics follow NATTEN's.

Tokens are the grid cells of ``shape`` in row-major order. Each axis is treated on its own and the
rule is their AND. On an axis of length L with kernel k, dilation d, stride s:

- dilation: coordinate x lies in group ``x % d`` at group coordinate ``c = x // d``; a query sees
  keys of its own group only, and the window below runs over group coordinates (group length
  ``n = L // d + (x % d < L % d)``).
- stride: queries are grouped in runs of s (``c // s``); all queries of a run use the window of the
  run's leader: the middle one ``(c // s) * s + s // 2`` (non-causal) or the last one
  ``(c // s) * s + s - 1`` (causal), clipped to ``n - 1``. s = 1 makes every query its own leader;
  s = k gives blocked (window) attention.
- non-causal window: ``k // 2`` keys left and ``(k - 1) // 2`` right of the leader (even k = 2r: r
  left, r - 1 right), shifted inward at the borders rather than cut, so every query sees exactly
  k keys: window start ``clamp(leader - k // 2, 0, n - k)``.
- causal window: keys from ``leader - k + 1`` up to the query itself (not the leader), cut at 0:
  early queries see fewer keys.

In the tile token order (``token_order`` / ``permuted``) a pattern is perfectly block-sparse (no
partial tiles) when, per axis, stride equals the tile, window starts land on tile edges
(``s // 2 - k // 2`` and ``n - k`` divisible by the tile) and k is a multiple of it: e.g. a
256x256 grid, kernel (24, 48), stride (8, 16) with the default 8x16 tile (paper 27's case).

Constraints: kernel_size >= 1 (NATTEN asks >= 2; 1 is allowed here as a self-only axis),
dilation >= 1, 1 <= stride <= kernel_size, kernel_size * dilation <= L. Grid patterns are
self-attention: Nq == Nk == prod(shape).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from ._args import check_shape, per_axis, per_axis_bool
from .grid import GridPattern, maximum, minimum
from .intervals import print_mask


@dataclass(frozen=True)
class Neighborhood(GridPattern):
    shape: Tuple[int, ...]
    kernel_size: Tuple[int, ...]
    dilation: Tuple[int, ...]
    stride: Tuple[int, ...]
    causal: Tuple[bool, ...]
    tile_shape: Tuple[int, ...] | None = None

    def _window(self, axis, c, n):
        k, s = self.kernel_size[axis], self.stride[axis]
        if self.causal[axis]:
            leader = c if s == 1 else minimum((c // s) * s + (s - 1), n - 1)
            return leader - (k - 1), c
        leader = c if s == 1 else minimum((c // s) * s + s // 2, n - 1)
        start = maximum(minimum(leader - k // 2, n - k), 0)
        return start, start + (k - 1)

    def __repr__(self):
        def show(values, default):
            return None if all(v == default for v in values) else (values[0] if len(set(values)) == 1 else values)

        args = [repr(self.shape), repr(show(self.kernel_size, None))]
        for name, values, default in (("dilation", self.dilation, 1), ("stride", self.stride, 1), ("causal", self.causal, False)):
            shown = show(values, default)
            if shown is not None:
                args.append(f"{name}={shown!r}")
        if self.tile_shape is not None:
            args.append(f"tile_shape={self.tile_shape!r}")
        return f"neighborhood({', '.join(args)})"


def neighborhood(shape, kernel_size, dilation=1, stride=1, causal=False, *, tile_shape=None) -> Neighborhood:
    """Neighborhood attention over a token grid (NATTEN semantics, see the module docstring).

    Parameters:
        shape: the grid, 1 to 3 ints; tokens are its cells in row-major order (N = prod(shape)).
        kernel_size: window per axis (int or tuple), >= 1, with kernel_size * dilation <= shape.
        dilation: interleaved groups per axis, >= 1.
        stride: queries sharing one window per axis, 1 <= stride <= kernel_size.
        causal: bool or tuple of bools per axis.

    Other Parameters:
        tile_shape: tile of the token order (``token_order`` / ``permuted``); None picks a tile of
            128 tokens (128, 8x16, 4x4x8) clipped to the grid. Match its volume to the kernel block.
    """
    shape = check_shape(shape)
    ndim = len(shape)
    kernel_size = per_axis("kernel_size", kernel_size, ndim, 1)
    dilation = per_axis("dilation", dilation, ndim, 1)
    stride = per_axis("stride", stride, ndim, 1)
    causal = per_axis_bool("causal", causal, ndim)
    if any(k * d > n for k, d, n in zip(kernel_size, dilation, shape)):
        raise ValueError(
            f"`kernel_size` * `dilation` must be <= the grid on every axis; got {kernel_size=}, {dilation=}, {shape=}"
        )
    if any(s > k for s, k in zip(stride, kernel_size)):
        raise ValueError(f"`stride` must be <= `kernel_size` on every axis; got {stride=}, {kernel_size=}")
    if tile_shape is not None:
        tile_shape = per_axis("tile_shape", tile_shape, ndim, 1)
    return Neighborhood(shape, kernel_size, dilation, stride, causal, tile_shape)


def main() -> None:
    print_mask(neighborhood(12, 5), 12, 12)
    print_mask(neighborhood(12, 4, dilation=2, stride=2), 12, 12)
    print_mask(neighborhood((4, 4), 3, causal=(True, False)), 16, 16)


if __name__ == "__main__":
    main()
