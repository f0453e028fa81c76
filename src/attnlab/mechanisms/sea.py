"""SEA: estimate the attention map with kernel-based linear attention, keep each row's top-k, attend on them.

Paper: "SEA: Sparse Linear Attention with Estimated Attention Mask" (paper 52,
https://arxiv.org/abs/2310.01777). Positive random features phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)
(Performer's kernel for exp(q . k)) give a linear-cost estimate A_hat ~ phi(q) phi(k)^T, row
normalised. Its top-k entries per row form the sparse mask of exact softmax attention, and A_hat
stays available for interpretation (``SEAAttention.estimated_map``). The estimator's input
projections start at the identity and learn to match the dense attention map (KL divergence,
teacher detached), added to the gradient while training. The paper estimates a compressed
(N x K) map with a small network and interpolates it to N x N; at toy sizes this file estimates
the N x N map directly, which keeps the same selection rule without the interpolation.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .routing import causal_mask, masked_attention
from .softmax import check_heads, merge_heads, split_heads
from .sparsifiner import attach_aux_loss, topk_mask


def random_features(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Positive random features of exp(x . y), in a stable split: x (B, H, N, D), w (m, D)
    -> (phi / exp(shift) (B, H, N, m), shift (B, H, N, 1)), each row shifted by its own maximum.

    x is scaled by D^-1/4 on both sides, so phi(q) . phi(k) estimates exp(q . k / sqrt(D)).
    """
    x = x * x.shape[-1] ** -0.25
    proj = x @ w.transpose(-1, -2) - x.square().sum(-1, keepdim=True) / 2
    shift = proj.detach().amax(-1, keepdim=True)
    return torch.exp(proj - shift) / math.sqrt(w.shape[0]), shift


def estimate_attention(q: Tensor, k: Tensor, w: Tensor, *, causal: bool = False) -> Tensor:
    """The estimated attention map: q (B, H, Nq, D), k (B, H, Nk, D), w (m, D) -> (B, H, Nq, Nk), rows sum to 1.

    Normalised in log space with each key's own shift: a shared shift over keys would let one large
    key underflow the others' estimates, and with ``causal`` let a future key change the past's selection.
    """
    fq, _ = random_features(q, w)  # a query's shift cancels in its row's normalisation
    fk, shift_k = random_features(k, w)
    log_scores = (fq @ fk.transpose(-1, -2)).clamp_min(torch.finfo(q.dtype).tiny).log() + shift_k.transpose(-1, -2)
    if causal:
        log_scores = log_scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    return torch.softmax(log_scores, -1)


def sea_attention(q: Tensor, k: Tensor, v: Tensor, estimate: Tensor, *, topk: int, causal: bool = False) -> Tensor:
    """Softmax attention on the top-k keys per row of ``estimate`` (B, H, Nq, Nk). q/k/v as in SDPA -> (B, H, Nq, Dv)."""
    return masked_attention(q, k, v, topk_mask(estimate, topk, causal=causal))


def estimator_loss(q: Tensor, k: Tensor, estimate: Tensor, *, causal: bool = False) -> Tensor:
    """KL(dense attention || estimate), the dense map detached (the teacher)."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~causal_mask(s.shape[-2], s.shape[-1], s.device), float("-inf"))
    teacher = torch.softmax(s, -1).detach()
    return (teacher * (teacher.clamp_min(1e-12).log() - estimate.clamp_min(1e-12).log())).sum(-1).mean()


class SEAAttention(nn.Module):
    """SEA attention (paper 52). Shapes: x (B, N, d_model) -> (B, N, d_model).

    Args:
        topk: keys kept per query (64 in the paper); min(topk, M) where fewer keys exist.
        n_features: random features per head dim of the kernel estimate.
        seed: seeds the random features, so estimates and selections are reproducible.
    ``last_estimate`` holds the latest estimated map (B, H, N, M), detached.
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool = False, topk: int = 8, n_features: int = 32,
                 seed: int = 0) -> None:
        super().__init__()
        check_heads(d_model, n_heads)
        if topk < 1 or n_features < 1:
            raise ValueError(f"`topk` and `n_features` must be >= 1; got {topk=}, {n_features=}")
        head_dim = d_model // n_heads
        self.d_model, self.n_heads, self.causal, self.topk = d_model, n_heads, causal, topk
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))
        self.est_q, self.est_k = nn.Linear(head_dim, head_dim, bias=False), nn.Linear(head_dim, head_dim, bias=False)
        for lin in (self.est_q, self.est_k):
            nn.init.eye_(lin.weight)  # start as Performer's unbiased estimate of the model's own attention
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("features", torch.randn(n_features, head_dim, generator=g))
        self.last_estimate: Tensor | None = None

    def _qkv(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        src = x if context is None else context
        return (split_heads(self.q_proj(x), self.n_heads), split_heads(self.k_proj(src), self.n_heads),
                split_heads(self.v_proj(src), self.n_heads))  # (B, H, N or M, D)

    def _estimate(self, q: Tensor, k: Tensor) -> Tensor:
        return estimate_attention(self.est_q(q), self.est_k(k), self.features.to(q.dtype), causal=self.causal)

    def estimated_map(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The estimated attention map for ``x``: (B, H, N, M), rows sum to 1."""
        q, k, _ = self._qkv(x, context)
        return self._estimate(q, k)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        q, k, v = self._qkv(x, context)
        est = self._estimate(q, k)
        self.last_estimate = est.detach()
        out = self.o_proj(merge_heads(sea_attention(q, k, v, est, topk=min(self.topk, k.shape[2]), causal=self.causal)))
        if self.training and torch.is_grad_enabled():
            out = attach_aux_loss(out, estimator_loss(q, k, est, causal=self.causal))
        return out

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}, topk={self.topk}, "
                f"n_features={self.features.shape[0]}")


def main() -> None:
    """Toy run on CPU: estimated vs exact attention of one head, and the top-3 selection."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    est = estimate_attention(q, k, torch.randn(4096, 8))
    print("estimate\n", est[0, 0].round(decimals=2))
    print("exact\n", torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)[0, 0].round(decimals=2))
    print(topk_mask(est, 3)[0, 0].int())


if __name__ == "__main__":
    main()
