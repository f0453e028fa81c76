"""Causal attention: query i sees keys up to its aligned position i + (Nk - Nq) (bottom-right)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import BlockLayout
from .intervals import IntervalPattern


@dataclass(frozen=True)
class Causal(IntervalPattern):
    def bounds(self, q, n_q, n_kv, device=None):
        return torch.zeros_like(q), q + (n_kv - n_q)

    def mask_mod(self, n_q, n_kv, device=None):
        offset = n_kv - n_q
        return lambda b, h, q, k: q + offset >= k

    def block_layout(self, n_q, n_kv, q_block=128, kv_block=128):
        offset = n_kv - n_q
        q0 = torch.arange(0, n_q, q_block)
        q1 = torch.clamp(q0 + q_block, max=n_q) - 1  # last query of each tile
        k0 = torch.arange(0, n_kv, kv_block)
        k1 = torch.clamp(k0 + kv_block, max=n_kv) - 1
        # The tile is touched if its last query sees its first key, full if its first query sees its last key.
        touched = (q1[:, None] + offset) >= k0[None, :]
        full = (q0[:, None] + offset) >= k1[None, :]
        return BlockLayout(full, touched & ~full, q_block, kv_block)

    def density(self, n_q, n_kv):
        offset = n_kv - n_q
        # Query i sees clamp(i + offset + 1, 0, Nk) keys; sum in closed form over i.
        seen = torch.clamp(torch.arange(n_q, dtype=torch.float64) + offset + 1, 0, n_kv)
        return float(seen.sum()) / (n_q * n_kv)

    def __repr__(self):
        return "causal()"


def causal() -> Causal:
    """Causal mask, bottom-right aligned for cross attention (Nq != Nk)."""
    return Causal()


def main() -> None:
    from .intervals import print_mask

    print_mask(causal(), 8, 8)
    print_mask(causal(), 5, 8)  # cross attention: the 5 queries sit at key positions 3..7


if __name__ == "__main__":
    main()
