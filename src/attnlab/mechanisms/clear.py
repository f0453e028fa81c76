"""CLEAR: convolution-like local attention, each query attending to keys within a circle around it.

Paper: "CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up" (Liu et al.,
2024, arXiv 2412.16112; paper 31).

On an (H, W) token grid, query (y, x) attends with ordinary softmax to the keys (y', x') with
``(y - y')^2 + (x - x')^2 < r^2`` (the authors' FlexAttention mask); the window is cut, not
shifted, at the borders. The cost is O(N r^2): linear in N for a fixed radius. The 1-D form for
sequences is ``|i - j| < r`` (a sliding window of 2r - 1 keys), and its causal form (attnlab's
extension; the paper is a non-causal image model) keeps ``i - r < j <= i``.

With ``n_text`` > 0 the sequence starts with text tokens that attend to and are attended by every
token, as CLEAR does in joint text-image attention (``GlobalPrefix``). Not here: the paper's
optional down-sampled extra keys/values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.patterns import BlockLayout, Pattern, blocked, inverse_permutation, sliding_window
from ..core.patterns.base import on_device_of
from ..core.patterns.grid import unravel
from ..core.patterns.intervals import print_mask
from .local_window import local_attention
from .softmax import check_heads, merge_heads, split_heads


def _check_radius(radius) -> None:
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1:
        raise ValueError(f"`radius` must be an integer >= 1; got {radius=}")


@dataclass(frozen=True)
class CircularWindow(Pattern):
    """Query (y, x) sees key (y', x') iff ``(y - y')^2 + (x - x')^2 < radius^2`` on an (H, W) grid.

    Tokens are the grid cells in row-major order (self-attention, N = H * W). The block layout and
    token order come from the circle's bounding box, ``blocked(shape, 1, radius - 1)``: every tile
    the box touches is marked partial (the kernel masks inside it), so the layout is conservative.
    """

    shape: tuple[int, int]
    radius: int

    @property
    def box(self) -> Pattern:
        """The clipped (2r - 1)^2 square around each query, which contains the circle."""
        return blocked(self.shape, 1, self.radius - 1)

    def mask_mod(self, n_q, n_kv, device=None):
        self.box.mask_mod(n_q, n_kv, device)  # checks n_q == n_kv == H * W
        r2 = self.radius**2

        def mod(b, h, q, k):
            (yq, xq), (yk, xk) = unravel(q, self.shape), unravel(k, self.shape)
            return (yq - yk) ** 2 + (xq - xk) ** 2 < r2

        return mod

    def block_layout(self, n_q, n_kv, q_block=128, kv_block=128):
        box = self.box.block_layout(n_q, n_kv, q_block, kv_block)
        return BlockLayout(torch.zeros_like(box.full), box.full | box.partial, q_block, kv_block)

    def density(self, n_q, n_kv):
        self.box.mask_mod(n_q, n_kv)
        h, w = self.shape
        r = self.radius
        pairs = 0
        for dy in range(-(r - 1), r):  # count queries whose offset (dy, dx) stays on the grid
            for dx in range(-(r - 1), r):
                if dy * dy + dx * dx < r * r:
                    pairs += max(h - abs(dy), 0) * max(w - abs(dx), 0)
        return pairs / (n_q * n_kv)

    def token_order(self, n_q, n_kv):
        return self.box.token_order(n_q, n_kv)

    def permuted(self):
        return _PermutedCircle(self)

    def __repr__(self):
        return f"circular_window({self.shape!r}, radius={self.radius})"


@dataclass(frozen=True)
class _PermutedCircle(Pattern):
    """A CircularWindow in its bounding box's tile order (see ``Pattern.token_order``)."""

    base: CircularWindow

    def mask_mod(self, n_q, n_kv, device=None):
        order = self.base.token_order(n_q, n_kv).to(device)
        inner = self.base.mask_mod(n_q, n_kv, device)
        return lambda b, h, q, k: inner(b, h, on_device_of(order, q)[q], on_device_of(order, k)[k])

    def block_layout(self, n_q, n_kv, q_block=128, kv_block=128):
        box = self.base.box.permuted().block_layout(n_q, n_kv, q_block, kv_block)
        return BlockLayout(torch.zeros_like(box.full), box.full | box.partial, q_block, kv_block)

    def density(self, n_q, n_kv):
        return self.base.density(n_q, n_kv)

    def __repr__(self):
        return f"{self.base!r}.permuted()"


@dataclass(frozen=True)
class GlobalPrefix(Pattern):
    """``n_global`` leading tokens (CLEAR's text tokens) that attend to and are attended by every
    token; the remaining ``n_local`` tokens follow ``base`` among themselves. N = n_global + n_local.

    The block layout is the generic one (the mask evaluated a chunk of rows at a time, O(N^2) work)
    and there is no token order: the prefix shifts the grid off the tile boundaries.
    """

    base: Pattern
    n_global: int
    n_local: int

    def mask_mod(self, n_q, n_kv, device=None):
        n = self.n_global + self.n_local
        if n_q != n or n_kv != n:
            raise ValueError(f"this pattern needs n_q == n_kv == n_global + n_local = {n}; got {n_q=}, {n_kv=}")
        g = self.n_global
        inner = self.base.mask_mod(self.n_local, self.n_local, device)
        # Prefix rows/columns are allowed outright; clamp keeps the base's indices on its own tokens.
        return lambda b, h, q, k: (q < g) | (k < g) | inner(b, h, (q - g).clamp(min=0), (k - g).clamp(min=0))

    def density(self, n_q, n_kv):
        self.mask_mod(n_q, n_kv)
        g, m, n = self.n_global, self.n_local, n_q
        local = self.base.density(m, m) * m * m if m else 0.0
        return (2 * g * n - g * g + local) / (n * n)

    def __repr__(self):
        return f"global_prefix({self.base!r}, n_global={self.n_global})"


def circular_window(shape: tuple[int, int], radius: int) -> CircularWindow:
    """CLEAR's circular local window on an (H, W) token grid (see ``CircularWindow``).

    Parameters:
        shape: the grid (H, W); tokens are its cells in row-major order.
        radius: keys at Euclidean distance < radius are visible (radius 1: the query alone).
    """
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else shape
    if not (isinstance(shape, tuple) and len(shape) == 2 and all(isinstance(s, int) and s >= 1 for s in shape)):
        raise ValueError(f"`shape` must be (H, W), two positive ints; got {shape=}")
    _check_radius(radius)
    return CircularWindow(shape, radius)


def clear_pattern(
    n: int, radius: int, *, grid: tuple[int, int] | None = None, causal: bool = False, n_text: int = 0
) -> Pattern:
    """The CLEAR window for N tokens: circular on ``grid`` (H, W), else 1-D ``|i - j| < radius``;
    with ``n_text`` leading text tokens that attend and are attended globally (non-causal only)."""
    _check_radius(radius)
    if isinstance(n_text, bool) or not isinstance(n_text, int) or not 0 <= n_text <= n:
        raise ValueError(f"`n_text` must be an integer in [0, N]; got {n_text=}, N={n}")
    if causal and n_text:
        raise ValueError(f"global text tokens have no causal form; got {causal=} with {n_text=}")
    if grid is None:
        p = sliding_window(radius, causal=True) if causal else sliding_window(2 * radius - 1)
    else:
        if causal:
            raise ValueError(f"CLEAR's 2-D circular window has no causal form; got {causal=} with {grid=}")
        p = circular_window(grid, radius)
        if grid[0] * grid[1] != n - n_text:
            raise ValueError(f"`grid` must cover the image tokens: H * W == N - n_text; got {grid=}, N={n}, {n_text=}")
    return GlobalPrefix(p, n_text, n - n_text) if n_text else p


def clear_attention(
    q: Tensor, k: Tensor, v: Tensor, *, radius: int, grid: tuple[int, int] | None = None, causal: bool = False,
    n_text: int = 0,
) -> Tensor:
    """CLEAR local softmax attention through ``attnlab.attention``.

    q, k (B, H, N, D), v (B, H, N, Dv) -> (B, H, N, Dv); ``n_text`` leading global tokens, then the
    image tokens on ``grid`` in row-major order (or a 1-D sequence when ``grid`` is None). Scale
    1 / sqrt(D).
    """
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"CLEAR attention is self-attention (Nq == Nk); got {q.shape[2]=}, {k.shape[2]=}")
    return local_attention(q, k, v, clear_pattern(q.shape[2], radius, grid=grid, causal=causal, n_text=n_text))


class ClearAttention(nn.Module):
    """Multi-head softmax attention restricted to CLEAR's circular (or 1-D) local window.

    Paper: "CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up" (paper 31).
    Shapes: x (B, N, d_model) -> (B, N, d_model). Self-attention only (``context`` raises).

    Args:
        causal: 1-D causal window (attnlab's extension).
        radius: window radius r (the released models use 8, 16, 32 on latent grids).
        grid: (H, W) of image tokens in row-major order, or None for a 1-D sequence.
        n_text: leading text tokens of a joint (MM-DiT) sequence, attending and attended globally.
    """

    def __init__(
        self, d_model: int, n_heads: int, *, causal: bool = False, radius: int = 8, grid: tuple[int, int] | None = None,
        n_text: int = 0,
    ) -> None:
        super().__init__()
        check_heads(d_model, n_heads)
        _check_radius(radius)
        if grid is not None:
            circular_window(grid, radius)  # validates grid
            if causal:
                raise ValueError(f"CLEAR's 2-D circular window has no causal form; got {causal=} with {grid=}")
        if isinstance(n_text, bool) or not isinstance(n_text, int) or n_text < 0 or (n_text and causal):
            raise ValueError(f"`n_text` must be an integer >= 0, and 0 when causal; got {n_text=}, {causal=}")
        self.d_model, self.n_heads, self.causal, self.radius, self.n_text = d_model, n_heads, causal, radius, n_text
        self.grid = None if grid is None else tuple(grid)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if context is not None:
            raise ValueError("ClearAttention is self-attention only (a window over its own tokens); got `context`")
        q, k, v = (split_heads(p(x), self.n_heads) for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, N, D)
        o = clear_attention(q, k, v, radius=self.radius, grid=self.grid, causal=self.causal, n_text=self.n_text)
        return self.o_proj(merge_heads(o))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}, radius={self.radius}, "
            f"grid={self.grid}, n_text={self.n_text}"
        )


def main() -> None:
    """Draw the circular window on a 5x5 grid (radius 2) and check its tile-order twin."""
    p = circular_window((5, 5), 2)
    print_mask(p, 25, 25)
    order = p.token_order(25, 25)
    if order is not None:
        back = p.permuted().mask(25, 25)[inverse_permutation(order)][:, inverse_permutation(order)]
        print("permuted mask agrees:", torch.equal(back, p.mask(25, 25)))


if __name__ == "__main__":
    main()
