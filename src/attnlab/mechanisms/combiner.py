"""Combiner-Fixed: full attention support at sub-quadratic cost, by a structured factorisation.

Paper: "Combiner: Full Attention Transformer with Sparse Computation Cost" (paper 38,
https://arxiv.org/abs/2107.05768). Attention is a conditional expectation over keys. The
sequence is cut into spans of ``span`` tokens. A query attends directly to the keys of its own
span (causal: the ones at or before it); every other span it may see (causal: earlier spans) is
one "abstraction" with a mean-pooled key k_r and a summary value v_r = sum_j q(j | r) v_j, where
q(j | r) = softmax over the span of (q_r . k_j) with q_r the span's mean-pooled query. Direct
keys and abstractions share one softmax; the abstraction's score gets + log(span), so a span of
identical keys weighs as its tokens would. Every visible key thus keeps a non-zero probability
p(r | i) q(j | r) (full attention), at O(N (span + N / span)) cost instead of O(N^2).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .routing import causal_mask
from .softmax import check_heads, merge_heads, split_heads


def check_span(span: int, n: int) -> None:
    if span < 1 or n % span:
        raise ValueError(f"`span` must be >= 1 and divide the sequence length; got {span=}, sequence length={n}")


def span_summaries(q: Tensor, k: Tensor, v: Tensor, span: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per span: pooled key (B, H, S, D), summary value (B, H, S, Dv), and q(j | r) (B, H, S, span).

    q, k (B, H, N, D), v (B, H, N, Dv); S = N / span.
    """
    qs, ks, vs = (t.unflatten(2, (-1, span)) for t in (q, k, v))  # (B, H, S, span, D)
    k_pool, q_pool = ks.mean(3), qs.mean(3)
    inner = torch.softmax((q_pool[..., None, :] * ks).sum(-1) * q.shape[-1] ** -0.5, -1)  # (B, H, S, span)
    return k_pool, (inner[..., None] * vs).sum(3), inner


def combiner_attention(q: Tensor, k: Tensor, v: Tensor, *, span: int, causal: bool = False) -> Tensor:
    """Combiner-Fixed self attention. q, k (B, H, N, D), v (B, H, N, Dv) -> (B, H, N, Dv).

    N must be a multiple of ``span``.
    """
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"Combiner is self attention: query and key lengths must match; got {q.shape[2]=}, {k.shape[2]=}")
    n, scale = q.shape[2], q.shape[-1] ** -0.5
    check_span(span, n)
    s = n // span
    k_pool, v_sum, _ = span_summaries(q, k, v, span)
    qs, ks, vs = (t.unflatten(2, (s, span)) for t in (q, k, v))  # (B, H, S, span, D)
    direct = (qs @ ks.transpose(-1, -2)) * scale  # (B, H, S, span, span)
    if causal:
        direct = direct.masked_fill(~causal_mask(span, span, q.device), float("-inf"))
    abstract = (qs @ k_pool[:, :, None].transpose(-1, -2)) * scale + math.log(span)  # (B, H, S, span, S)
    # Hidden abstractions: the own span (attended directly) and, causal, every later span.
    hidden = torch.eye(s, dtype=torch.bool, device=q.device) if not causal else ~causal_mask(s, s, q.device).tril(-1)
    abstract = abstract.masked_fill(hidden[:, None, :], float("-inf"))
    probs = torch.softmax(torch.cat([direct, abstract], -1), -1)
    out = probs[..., :span] @ vs + probs[..., span:] @ v_sum[:, :, None]  # (B, H, S, span, Dv)
    return out.flatten(2, 3)


class CombinerAttention(nn.Module):
    """Combiner-Fixed attention (paper 38). Shapes: x (B, N, d_model) -> (B, N, d_model).

    Args:
        span: tokens per span; must divide N. About sqrt(N) gives the paper's O(N sqrt(N)) cost.
    Self attention only: ``context`` raises ValueError.
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool = False, span: int = 8) -> None:
        super().__init__()
        check_heads(d_model, n_heads)
        if span < 1:
            raise ValueError(f"`span` must be >= 1; got {span=}")
        self.d_model, self.n_heads, self.causal, self.span = d_model, n_heads, causal, span
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if context is not None:
            raise ValueError("Combiner attention here is self attention only; got a `context`")
        q, k, v = (split_heads(p(x), self.n_heads) for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, N, D)
        return self.o_proj(merge_heads(combiner_attention(q, k, v, span=self.span, causal=self.causal)))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}, span={self.span}"


def main() -> None:
    """Toy run on CPU: a causal 8-token sequence in spans of 4; every past token keeps some attention."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4)
    eye = torch.eye(8)[None, None]  # v = one-hot positions: the output row is the attention row
    print(combiner_attention(q, k, eye, span=4, causal=True)[0, 0].round(decimals=2))


if __name__ == "__main__":
    main()
