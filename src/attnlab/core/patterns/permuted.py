"""A grid pattern seen in its tile token order (GNA-style token permutation).

Kernels call ``order = p.token_order(n, n)``, run attention on ``x[:, :, order]`` with
``p.permuted()`` and restore ``out[:, :, inverse_permutation(order)]``. The permuted pattern's
mask_mod maps positions back to grid tokens through the captured ``order`` tensor; its block layout
comes from the boxes each kernel block covers in tile order (``tiling.tile_blocks``), so it is exact
and needs no N x N evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass

from ._args import check_grid_lengths
from .base import Pattern, on_device_of
from .grid import GridPattern
from .grid_layout import layout_from_boxes
from .intervals import print_mask
from .tiling import resolved_tile, tile_blocks, tile_order


@dataclass(frozen=True)
class Permuted(Pattern):
    base: GridPattern

    @property
    def tile_shape(self):
        return resolved_tile(self.base)

    def mask_mod(self, n_q, n_kv, device=None):
        check_grid_lengths(self.base.shape, n_q, n_kv)
        order = tile_order(self.base).to(device)
        inner = self.base.mask_mod(n_q, n_kv, device)
        return lambda b, h, q, k: inner(b, h, on_device_of(order, q)[q], on_device_of(order, k)[k])

    def block_layout(self, n_q, n_kv, q_block=128, kv_block=128):
        check_grid_lengths(self.base.shape, n_q, n_kv)
        q_boxes = tile_blocks(self.base, q_block)
        k_boxes = q_boxes if kv_block == q_block else tile_blocks(self.base, kv_block)
        return layout_from_boxes(self.base, q_boxes, k_boxes, q_block, kv_block)

    def density(self, n_q, n_kv):
        return self.base.density(n_q, n_kv)

    def __repr__(self):
        return f"{self.base!r}.permuted()"


def main() -> None:
    from .neighborhood import neighborhood

    p = neighborhood((4, 4), 3, tile_shape=(2, 2))
    print("token order:", p.token_order(16, 16).tolist())
    print_mask(p.permuted(), 16, 16)


if __name__ == "__main__":
    main()
