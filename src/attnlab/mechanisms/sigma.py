"""DiffQKV attention: Q, K and V with their own head counts and head dims (differential rescaling).

Paper: "Sigma: Differential Rescaling of Query, Key and Value for Efficient Language Models"
(Lin et al., arXiv 2501.13629; paper 35). What the paper prescribes (§2, App. B.5, Table 14):

- differentially compressed KV: fewer K heads than V heads (SIGMA: 32 Q, 4 K, 16 V heads; the
  model is more sensitive to losing V heads than K heads, Table 1), and optionally a K head dim
  below the V head dim (d_k = d_v / 2 costs little, Table 2). A smaller K is lifted to the query's
  head dim by a trainable feed-forward layer before the dot product ("transforming the dimension of
  K to the same as V"); SIGMA itself keeps d_k = d_v.
- augmented Q: the query goes through a wider intermediate width (SIGMA: 1.5 x hidden, 3072 for
  hidden 2048) before it is split into heads; queries are never cached, so the extra parameters cost
  little at inference time (Table 3: +0.6 to +1.5 points).
- GroupSharing: query head h reads K head h // (Hq / Hk) and V head h // (Hq / Hv).

attnlab's choices where the paper is silent: no activation between the two query projections (none
is described), one K up-projection shared by all K heads, and head counts rounded to divisors of
``n_heads`` when the 1/8 (K) and 1/2 (V) ratios of SIGMA do not divide it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .softmax import check_heads, merge_heads, softmax_attention, split_heads


def diffqkv_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, k_up: Tensor | None = None) -> Tensor:
    """Softmax attention with Hq query heads over Hk key heads and Hv value heads (GroupSharing).

    Args:
        q: (B, Hq, Nq, D). k: (B, Hk, Nk, Dk). v: (B, Hv, Nk, Dv); Hk and Hv divide Hq.
        k_up: (Dk, D) lifts compressed keys to the query's head dim (required when Dk != D).
        causal: bottom-right aligned causal mask.

    Returns:
        (B, Hq, Nq, Dv).
    """
    hq, hk, hv = q.shape[1], k.shape[1], v.shape[1]
    if hk < 1 or hv < 1 or hq % hk or hq % hv:
        raise ValueError(f"key and value head counts must divide the query heads; got Hq={hq}, Hk={hk}, Hv={hv}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length; got {tuple(k.shape)=}, {tuple(v.shape)=}")
    if k_up is not None:
        k = k @ k_up  # (B, Hk, Nk, D)
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"key head dim must match the query's (pass `k_up`); got {k.shape[-1]=}, {q.shape[-1]=}")
    k = k.repeat_interleave(hq // hk, dim=1)  # (B, Hq, Nk, D): GroupSharing of K
    v = v.repeat_interleave(hq // hv, dim=1)  # (B, Hq, Nk, Dv): GroupSharing of V, its own groups
    return softmax_attention(q, k, v, causal=causal)


def largest_divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of n that is <= max(cap, 1)."""
    return max(d for d in range(1, max(cap, 1) + 1) if n % d == 0)


class DiffQKVAttention(nn.Module):
    """Sigma's DiffQKV attention with its own projections (no bias).

    Paper: "Sigma: Differential Rescaling of Query, Key and Value for Efficient Language Models" (paper 35).
    Shapes: x (B, N, d_model) -> (B, N, d_model); ``context`` (B, M, d_model) gives cross attention.

    Args:
        n_heads: query heads Hq; the query and value head dim is d_model // n_heads.
        n_k_heads: key heads (default: SIGMA's Hq / 8, rounded down to a divisor of n_heads, >= 1).
        n_v_heads: value heads (default: SIGMA's Hq / 2, rounded likewise).
        k_head_dim: key head dim (default: the head dim, as in SIGMA; the paper's ablation halves it).
        q_aug_dim: width of the augmented query's intermediate projection (default: 1.5 x d_model, as
            in SIGMA); 0 turns augmented Q off (one plain d_model -> d_model query projection).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        causal: bool = False,
        n_k_heads: int | None = None,
        n_v_heads: int | None = None,
        k_head_dim: int | None = None,
        q_aug_dim: int | None = None,
    ) -> None:
        super().__init__()
        check_heads(d_model, n_heads)
        head_dim = d_model // n_heads
        n_k_heads = largest_divisor_at_most(n_heads, n_heads // 8) if n_k_heads is None else n_k_heads
        n_v_heads = largest_divisor_at_most(n_heads, n_heads // 2) if n_v_heads is None else n_v_heads
        k_head_dim = head_dim if k_head_dim is None else k_head_dim
        q_aug_dim = (3 * d_model) // 2 if q_aug_dim is None else q_aug_dim
        for name, val in (("n_k_heads", n_k_heads), ("n_v_heads", n_v_heads)):
            if not isinstance(val, int) or val < 1 or n_heads % val:
                raise ValueError(f"`{name}` must be a positive divisor of n_heads={n_heads}; got {name}={val!r}")
        if not isinstance(k_head_dim, int) or k_head_dim < 1:
            raise ValueError(f"`k_head_dim` must be a positive integer; got {k_head_dim=}")
        if not isinstance(q_aug_dim, int) or q_aug_dim < 0:
            raise ValueError(f"`q_aug_dim` must be a non-negative integer (0 = no augmented Q); got {q_aug_dim=}")
        self.d_model, self.n_heads, self.causal, self.head_dim = d_model, n_heads, causal, head_dim
        self.n_k_heads, self.n_v_heads, self.k_head_dim, self.q_aug_dim = n_k_heads, n_v_heads, k_head_dim, q_aug_dim
        if q_aug_dim:
            self.q_aug = nn.Linear(d_model, q_aug_dim, bias=False)  # the augmented (intermediate) query width
            self.q_proj = nn.Linear(q_aug_dim, d_model, bias=False)
        else:
            self.q_aug = None
            self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, n_k_heads * k_head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_v_heads * head_dim, bias=False)
        # Compressed keys are lifted to the query's head dim by a trainable layer (paper §2, Obs. 2).
        self.k_up = nn.Linear(k_head_dim, head_dim, bias=False) if k_head_dim != head_dim else None
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def query(self, x: Tensor) -> Tensor:
        """(B, N, d_model) -> (B, Hq, N, head_dim) through the augmented intermediate width."""
        h = self.q_aug(x) if self.q_aug is not None else x
        return split_heads(self.q_proj(h), self.n_heads)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        src = x if context is None else context
        q = self.query(x)  # (B, Hq, N, D)
        k = split_heads(self.k_proj(src), self.n_k_heads)  # (B, Hk, M, Dk): the small K cache
        v = split_heads(self.v_proj(src), self.n_v_heads)  # (B, Hv, M, D)
        k_up = self.k_up.weight.T if self.k_up is not None else None
        return self.o_proj(merge_heads(diffqkv_attention(q, k, v, causal=self.causal, k_up=k_up)))

    def kv_cache_per_token(self) -> int:
        """Cached numbers per token and layer: Hk * Dk + Hv * Dv (MHA: 2 * d_model)."""
        return self.n_k_heads * self.k_head_dim + self.n_v_heads * self.head_dim

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, heads q/k/v={self.n_heads}/{self.n_k_heads}/{self.n_v_heads}, "
                f"head dims q/k/v={self.head_dim}/{self.k_head_dim}/{self.head_dim}, "
                f"q_aug_dim={self.q_aug_dim}, causal={self.causal}")


def main() -> None:
    """Toy run on CPU: SIGMA-1.5B's head layout at toy width, and its KV cache against MHA's."""
    m = DiffQKVAttention(256, 32, causal=True)  # 32 q heads -> 4 k heads, 16 v heads, q_aug 384
    y = m(torch.randn(1, 10, 256))
    print(m, tuple(y.shape), f"KV cache per token: {m.kv_cache_per_token()} vs MHA {2 * 256}")


if __name__ == "__main__":
    main()
