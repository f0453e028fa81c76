"""Bi-level routing attention: route whole regions first, then attend token to token in the routed regions.

Paper: "BiFormer: Vision Transformer with Bi-Level Routing Attention" (paper 11,
https://arxiv.org/abs/2303.08810). Queries and keys are mean-pooled per region; the region
affinity (pooled q)(pooled k)^T picks the top-k key regions of each query region (the routing is
not differentiated, as in the paper's default); then each query attends to the tokens of its
routed regions, gathered so that the cost is top-k regions, not N. Sequences use 1-D regions of
consecutive tokens; a grid (H, W) uses 2-D regions of (H/S, W/S) tokens. The causal form (ours;
the paper is noncausal) routes each query token alone over the regions wholly in its past, plus
its own region, because pooled regions would leak later tokens. The paper's LePE
(a depthwise convolution on V) belongs to its block, not to the routing, and is left out.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .routing import causal_mask, masked_attention
from .softmax import check_heads, merge_heads, split_heads


def check_regions(n_regions: int, topk: int, n: int, what: str = "sequence length") -> None:
    if n_regions < 1 or n % n_regions:
        raise ValueError(f"`n_regions` must be >= 1 and divide the {what}; got {n_regions=}, {what}={n}")
    if not 1 <= topk <= n_regions:
        raise ValueError(f"`topk` must be in [1, n_regions]; got {topk=}, {n_regions=}")


def grid_order(grid: tuple[int, int], n_regions: int) -> Tensor:
    """Token permutation putting the tokens of each 2-D region together: (H * W,) int64.

    Row-major token t of an (H, W) grid lands at position order.argsort()[t]; regions are
    ``n_regions`` x ``n_regions`` tiles of (H / S, W / S) tokens, listed row-major.
    """
    h, w = grid
    if h % n_regions or w % n_regions:
        raise ValueError(f"`n_regions` must divide both grid sides; got {n_regions=}, {grid=}")
    idx = torch.arange(h * w).view(n_regions, h // n_regions, n_regions, w // n_regions)
    return idx.permute(0, 2, 1, 3).reshape(-1)


def route_regions(q: Tensor, k: Tensor, n_regions: int, topk: int) -> Tensor:
    """Top-k key regions per query region from the pooled region affinity (noncausal).

    q (B, H, Nq, D), k (B, H, Nk, D) -> (B, H, S, topk) int64 region indices.
    """
    check_regions(n_regions, topk, q.shape[2], "query length")
    check_regions(n_regions, topk, k.shape[2], "key length")
    qr = q.unflatten(2, (n_regions, -1)).mean(3)  # (B, H, S, D)
    kr = k.unflatten(2, (n_regions, -1)).mean(3)
    return (qr @ kr.transpose(-1, -2)).detach().topk(topk, dim=-1).indices


def route_causal(q: Tensor, k: Tensor, n_regions: int, topk: int) -> Tensor:
    """Causal routing: each query token keeps its own region and picks topk - 1 complete earlier regions.

    A pooled query region would mix in later queries, and the query's own pooled key region later
    keys, so the causal form routes each query token alone against the pooled keys of the regions
    that lie wholly in its past. q, k (B, H, N, D) -> (B, H, N, topk) region indices, own region
    first; picks beyond the earlier regions that exist are -1.
    """
    check_regions(n_regions, topk, q.shape[2])
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"causal bi-level routing needs equal query and key lengths; got {q.shape[2]=}, {k.shape[2]=}")
    n = q.shape[2]
    own = torch.arange(n, device=q.device) // (n // n_regions)  # (N,) region of each token
    kr = k.unflatten(2, (n_regions, -1)).mean(3)  # (B, H, S, D)
    aff = (q @ kr.transpose(-1, -2)).detach()  # (B, H, N, S)
    aff = aff.masked_fill(torch.arange(n_regions, device=q.device) >= own[:, None], float("-inf"))
    score, idx = aff.topk(topk - 1, dim=-1)
    idx = idx.masked_fill(score == float("-inf"), -1)
    return torch.cat([own.expand(*idx.shape[:-1])[..., None], idx], -1)


def selection_mask(idx: Tensor, n_regions: int, n_q: int, n_k: int, *, causal: bool = False) -> Tensor:
    """The token-level selection, (B, H, Nq, Nk) bool.

    idx: (B, H, S, topk) from ``route_regions``, or with ``causal`` (B, H, N, topk) from
    ``route_causal`` (Nq == Nk == N). Index -1 selects nothing.
    """
    b, h, rows, _ = idx.shape
    picked = torch.zeros(b, h, rows, n_regions + 1, dtype=torch.bool, device=idx.device)
    picked.scatter_(-1, idx % (n_regions + 1), True)  # -1 lands in the spare last column
    picked = picked[..., :n_regions].repeat_interleave(n_k // n_regions, 3)  # (B, H, rows, Nk)
    if causal:
        return picked & causal_mask(n_q, n_k, idx.device)
    return picked.repeat_interleave(n_q // n_regions, 2)


def bilevel_routing_attention(q: Tensor, k: Tensor, v: Tensor, *, n_regions: int, topk: int,
                              causal: bool = False) -> tuple[Tensor, Tensor]:
    """Bi-level routing attention on 1-D regions (permute tokens with ``grid_order`` for 2-D).

    q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) -> (out (B, H, Nq, Dv), region indices).
    Nq and Nk must be multiples of S = ``n_regions``. Noncausal: indices (B, H, S, topk), and the
    keys of the routed regions are gathered, so each query region scores topk * Nk / S keys.
    Causal (Nq == Nk): indices (B, H, N, topk) from ``route_causal``; the per-token selection runs
    as a dense masked softmax (a toy-size path, not a fast one).
    """
    if causal:
        idx = route_causal(q, k, n_regions, topk)
        return masked_attention(q, k, v, selection_mask(idx, n_regions, q.shape[2], k.shape[2], causal=True)), idx
    idx = route_regions(q, k, n_regions, topk)
    b, h, n_q, d = q.shape
    s, rq, rk = n_regions, n_q // n_regions, k.shape[2] // n_regions
    safe = idx[..., None, None]  # (B, H, S, topk, 1, 1)
    gather = lambda t: t.unflatten(2, (s, rk)).unsqueeze(2).expand(b, h, s, s, rk, t.shape[-1]).gather(
        3, safe.expand(b, h, s, topk, rk, t.shape[-1])).flatten(3, 4)  # (B, H, S, topk * Rk, D)
    kg, vg = gather(k), gather(v)
    scores = (q.unflatten(2, (s, rq)) @ kg.transpose(-1, -2)) * d ** -0.5  # (B, H, S, Rq, topk * Rk)
    return (torch.softmax(scores, -1) @ vg).flatten(2, 3), idx


class BiLevelRoutingAttention(nn.Module):
    """BiFormer's bi-level routing attention (paper 11). Shapes: x (B, N, d_model) -> (B, N, d_model).

    Args:
        n_regions: regions per sequence (1-D) or per grid side (2-D); must divide N (or H and W).
        topk: routed key regions per query region, <= number of regions.
        grid: (H, W) for image tokens in row-major order (N = H * W); None for sequences.
    ``context`` (B, M, d_model) gives noncausal cross attention over M / n_regions key regions.
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool = False, n_regions: int = 4, topk: int = 2,
                 grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        check_heads(d_model, n_heads)
        if n_regions < 1:
            raise ValueError(f"`n_regions` must be >= 1; got {n_regions=}")
        total = n_regions * n_regions if grid is not None else n_regions
        if not 1 <= topk <= total:
            raise ValueError(f"`topk` must be in [1, number of regions]; got {topk=}, number of regions={total}")
        if grid is not None and causal:
            raise ValueError("2-D regions have no causal form; got `grid` with causal=True")
        self.d_model, self.n_heads, self.causal = d_model, n_heads, causal
        self.n_regions, self.topk, self.grid = n_regions, topk, grid
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if context is not None and (self.causal or self.grid is not None):
            raise ValueError("bi-level routing cross attention (`context`) is 1-D and noncausal only")
        src = x if context is None else context
        q = split_heads(self.q_proj(x), self.n_heads)  # (B, H, N, D)
        k = split_heads(self.k_proj(src), self.n_heads)  # (B, H, M, D)
        v = split_heads(self.v_proj(src), self.n_heads)
        if self.grid is None:
            out, _ = bilevel_routing_attention(q, k, v, n_regions=self.n_regions, topk=self.topk, causal=self.causal)
        else:
            if x.shape[1] != self.grid[0] * self.grid[1]:
                raise ValueError(f"`grid` must cover the sequence; got grid={self.grid}, N={x.shape[1]}")
            order = grid_order(self.grid, self.n_regions).to(x.device)
            q, k, v = (t[:, :, order] for t in (q, k, v))
            out, _ = bilevel_routing_attention(q, k, v, n_regions=self.n_regions ** 2, topk=self.topk)
            out = out[:, :, order.argsort()]
        return self.o_proj(merge_heads(out))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}, "
                f"n_regions={self.n_regions}, topk={self.topk}, grid={self.grid}")


def main() -> None:
    """Toy run on CPU: the token-level selection of one head for a causal sequence of 12 tokens."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8)
    idx = route_causal(q, k, 4, 2)
    for row in selection_mask(idx, 4, 12, 12, causal=True)[0, 0].int().tolist():
        print("".join(".#"[b] for b in row))


if __name__ == "__main__":
    main()
