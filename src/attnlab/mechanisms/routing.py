"""Routing attention: online spherical k-means routes queries and keys; attention runs within clusters.

Paper: "Efficient Content-Based Sparse Attention with Routing Transformers" (paper 13,
https://arxiv.org/abs/2003.05997). Query i may attend key j when both are nearest to the same
centroid; centroids follow an exponential moving average of the (unit-normalised) queries and keys
routed to them during training. This file also holds ``masked_attention``, the dense masked
softmax that the content-routed mechanisms of this package share (the selection is computed once,
then attention runs on it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .softmax import check_heads, merge_heads, split_heads


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, *, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale) v over the keys where ``mask`` is True; rows with no key give zeros.

    q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv), mask bool broadcastable to (B, H, Nq, Nk)
    -> (B, H, Nq, Dv).
    """
    mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    empty = ~mask.any(-1, keepdim=True)  # (B, H, Nq, 1)
    # An empty row would be NaN inside SDPA (and in its backward on some kernels): open it, then zero it.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty, scale=scale)
    return out.masked_fill(empty, 0.0)


def causal_mask(n_q: int, n_k: int, device=None) -> Tensor:
    """(Nq, Nk) bool, bottom-right aligned: query i sees keys j <= i + Nk - Nq."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(n_k - n_q)


def check_clusters(n_clusters: int, n_keys: int) -> None:
    if not 1 <= n_clusters <= n_keys:
        raise ValueError(f"`n_clusters` must be in [1, number of keys]; got {n_clusters=}, number of keys={n_keys}")


def route(x: Tensor, centroids: Tensor) -> Tensor:
    """Nearest centroid by cosine similarity. x (B, H, N, D), centroids (H, C, D) -> (B, H, N) int64."""
    return torch.einsum("bhnd,hcd->bhnc", F.normalize(x, dim=-1), F.normalize(centroids, dim=-1)).argmax(-1)


def routing_mask(q: Tensor, k: Tensor, centroids: Tensor, *, causal: bool = False) -> Tensor:
    """The routing selection: (B, H, Nq, Nk) bool, True where query and key share a cluster.

    With ``causal`` the mask is also bottom-right causal, and each query keeps its own position
    (self attention only) so that no row is empty: a token may be routed away from all its past keys.
    """
    check_clusters(centroids.shape[1], k.shape[2])
    mask = route(q, centroids)[..., :, None] == route(k, centroids)[..., None, :]
    if causal:
        n_q, n_k = q.shape[2], k.shape[2]
        mask = mask & causal_mask(n_q, n_k, q.device)
        if n_q == n_k:
            mask = mask | torch.eye(n_q, dtype=torch.bool, device=q.device)
    return mask


def routing_attention(q: Tensor, k: Tensor, v: Tensor, centroids: Tensor, *, causal: bool = False) -> Tensor:
    """Attention within k-means clusters. q (B, H, Nq, D), k/v (B, H, Nk, D), centroids (H, C, D) -> (B, H, Nq, D)."""
    return masked_attention(q, k, v, routing_mask(q, k, centroids, causal=causal))


@torch.no_grad()
def ema_update(centroids: Tensor, x: Tensor, decay: float) -> Tensor:
    """One online k-means step: each centroid moves toward the mean of the unit vectors routed to it.

    centroids (H, C, D), x (B, H, N, D) -> new centroids (H, C, D), unit norm. Empty clusters stay.
    """
    h, c, d = centroids.shape
    assign = F.one_hot(route(x, centroids), c).to(x.dtype)  # (B, H, N, C)
    sums = torch.einsum("bhnc,bhnd->hcd", assign, F.normalize(x, dim=-1))
    counts = assign.sum((0, 2))[..., None]  # (H, C, 1)
    means = sums / counts.clamp_min(1)
    moved = decay * centroids + (1 - decay) * means
    return F.normalize(torch.where(counts > 0, moved, centroids), dim=-1)


class RoutingAttention(nn.Module):
    """Routing Transformer attention (paper 13). Shapes: x (B, N, d_model) -> (B, N, d_model).

    Args:
        n_clusters: k-means clusters per head (the paper uses about sqrt(N)); must not exceed N.
        decay: EMA decay of the centroids (0.999 in the paper's code; lower trains toy runs faster).
        seed: seeds the initial centroids, so selections are reproducible.
    Centroids are a buffer updated in training mode only, from queries and keys together.
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool = False, n_clusters: int = 4,
                 decay: float = 0.99, seed: int = 0) -> None:
        super().__init__()
        check_heads(d_model, n_heads)
        if n_clusters < 1:
            raise ValueError(f"`n_clusters` must be >= 1; got {n_clusters=}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"`decay` must be in [0, 1); got {decay=}")
        self.d_model, self.n_heads, self.causal, self.decay = d_model, n_heads, causal, decay
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))
        g = torch.Generator().manual_seed(seed)
        init = torch.randn(n_heads, n_clusters, d_model // n_heads, generator=g)
        self.register_buffer("centroids", F.normalize(init, dim=-1))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        src = x if context is None else context
        q = split_heads(self.q_proj(x), self.n_heads)  # (B, H, N, D)
        k = split_heads(self.k_proj(src), self.n_heads)  # (B, H, M, D)
        v = split_heads(self.v_proj(src), self.n_heads)
        out = routing_attention(q, k, v, self.centroids.to(q.dtype), causal=self.causal)
        if self.training:
            both = torch.cat([q, k], dim=2).detach().to(self.centroids.dtype)
            self.centroids.copy_(ema_update(self.centroids, both, self.decay))
        return self.o_proj(merge_heads(out))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}, "
                f"n_clusters={self.centroids.shape[1]}, decay={self.decay}")


def main() -> None:
    """Toy run on CPU: which keys each query of one head is routed to."""
    torch.manual_seed(0)
    m = RoutingAttention(16, 2, causal=True, n_clusters=3)
    x = torch.randn(1, 10, 16)
    q, k = split_heads(m.q_proj(x), 2), split_heads(m.k_proj(x), 2)
    for row in routing_mask(q, k, m.centroids, causal=True)[0, 0].int().tolist():
        print("".join(".#"[b] for b in row))


if __name__ == "__main__":
    main()
