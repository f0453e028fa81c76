"""Sparsifiner: a cheap low-rank connectivity predictor picks each query's top-k keys; attention runs on them.

Paper: "Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision
Transformers" (paper 43, https://arxiv.org/abs/2303.13755). Queries and keys are projected to a
low rank (head_dim / ``reduce``); their softmax scores approximate the attention map, whose
top-k entries per row (a budget of ``keep_rate`` * N keys) form a binary, instance-dependent mask
(detached); exact softmax attention then runs on the mask. The predictor learns by reconstructing
the dense attention map (teacher detached), a loss this module adds to the gradient itself while
training (``attach_aux_loss``), so any training loop trains it. The paper also compresses keys
along tokens with a learned N -> N/8 basis; that needs a fixed N and is left out here.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .routing import causal_mask, masked_attention
from .softmax import check_heads, merge_heads, split_heads


class _AuxLoss(torch.autograd.Function):
    """Identity on ``out`` whose backward also sends gradient 1 into ``loss``."""

    @staticmethod
    def forward(ctx, out: Tensor, loss: Tensor) -> Tensor:
        ctx.loss_shape = loss.shape
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, grad.new_ones(ctx.loss_shape)


def attach_aux_loss(out: Tensor, loss: Tensor) -> Tensor:
    """``out`` unchanged, but backpropagating through it also minimises ``loss`` (a scalar).

    This lets a module train a side network (a predictor, an estimator) inside any training loop.
    """
    return _AuxLoss.apply(out, loss)


def topk_mask(scores: Tensor, topk: int, *, causal: bool = False) -> Tensor:
    """Top-k entries per row of ``scores`` (B, H, Nq, Nk) as a bool mask; causal rows keep only visible keys."""
    n_q, n_k = scores.shape[-2:]
    if not 1 <= topk <= n_k:
        raise ValueError(f"`topk` must be in [1, number of keys]; got {topk=}, number of keys={n_k}")
    if causal:
        visible = causal_mask(n_q, n_k, scores.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.detach().topk(topk, -1).indices, True)
    return mask & visible if causal else mask


def sparsifiner_attention(q: Tensor, k: Tensor, v: Tensor, q_low: Tensor, k_low: Tensor, *, topk: int,
                          causal: bool = False) -> tuple[Tensor, Tensor]:
    """Attention on the top-k keys of the low-rank connectivity estimate.

    q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv), q_low (B, H, Nq, R), k_low (B, H, Nk, R)
    -> (out (B, H, Nq, Dv), mask (B, H, Nq, Nk) bool).
    """
    mask = topk_mask(q_low @ k_low.transpose(-1, -2), topk, causal=causal)
    return masked_attention(q, k, v, mask), mask


def connectivity_loss(q: Tensor, k: Tensor, q_low: Tensor, k_low: Tensor, *, causal: bool = False) -> Tensor:
    """Mean squared error between the predicted attention map and the dense one (teacher detached)."""
    def probs(a: Tensor, b: Tensor) -> Tensor:
        s = a @ b.transpose(-1, -2) / math.sqrt(a.shape[-1])
        if causal:
            s = s.masked_fill(~causal_mask(s.shape[-2], s.shape[-1], s.device), float("-inf"))
        return torch.softmax(s, -1)
    return (probs(q_low, k_low) - probs(q, k).detach()).square().sum(-1).mean()


class SparsifinerAttention(nn.Module):
    """Sparsifiner attention (paper 43). Shapes: x (B, N, d_model) -> (B, N, d_model).

    Args:
        keep_rate: share of keys each query keeps (0.25 in the paper); top-k = ceil(keep_rate * M).
        reduce: head_dim / predictor rank (2 in the paper).
    ``last_mask`` holds the latest selection (B, H, N, M) for inspection.
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool = False, keep_rate: float = 0.25,
                 reduce: int = 2) -> None:
        super().__init__()
        check_heads(d_model, n_heads)
        if not 0 < keep_rate <= 1:
            raise ValueError(f"`keep_rate` must be in (0, 1]; got {keep_rate=}")
        head_dim = d_model // n_heads
        if reduce < 1 or head_dim % reduce:
            raise ValueError(f"`reduce` must be >= 1 and divide the head dim; got {reduce=}, head_dim={head_dim}")
        self.d_model, self.n_heads, self.causal, self.keep_rate = d_model, n_heads, causal, keep_rate
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))
        self.q_low = nn.Linear(head_dim, head_dim // reduce, bias=False)  # shared by heads, as the paper's predictor
        self.k_low = nn.Linear(head_dim, head_dim // reduce, bias=False)
        self.last_mask: Tensor | None = None

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        src = x if context is None else context
        q = split_heads(self.q_proj(x), self.n_heads)  # (B, H, N, D)
        k = split_heads(self.k_proj(src), self.n_heads)  # (B, H, M, D)
        v = split_heads(self.v_proj(src), self.n_heads)
        ql, kl = self.q_low(q), self.k_low(k)  # (B, H, N, R), (B, H, M, R)
        topk = max(1, math.ceil(self.keep_rate * k.shape[2]))
        out, self.last_mask = sparsifiner_attention(q, k, v, ql, kl, topk=topk, causal=self.causal)
        out = self.o_proj(merge_heads(out))
        if self.training and torch.is_grad_enabled():
            out = attach_aux_loss(out, connectivity_loss(q, k, ql, kl, causal=self.causal))
        return out

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}, keep_rate={self.keep_rate}, "
                f"rank={self.q_low.out_features}")


def main() -> None:
    """Toy run on CPU: the instance-dependent mask of one head for 8 tokens, keeping 3 keys per query."""
    torch.manual_seed(0)
    m = SparsifinerAttention(16, 2, keep_rate=3 / 8)
    m(torch.randn(1, 8, 16))
    for row in m.last_mask[0, 0].int().tolist():
        print("".join(".#"[b] for b in row))


if __name__ == "__main__":
    main()
