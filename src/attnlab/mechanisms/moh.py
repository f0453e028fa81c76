"""Mixture-of-Head attention: shared heads always on, top-k routed heads per token, a weighted sum of heads.

Paper: "MoH: Multi-Head Attention as Mixture-of-Head Attention" (Jin, Zhu, Yuan, Yan; arXiv
2410.11842; paper 12). Multi-head attention is a sum over heads, ``sum_h H_h W_O^h``; MoH treats the
heads as experts and makes it a token-dependent weighted sum ``sum_h g_h(x) H_h W_O^h``:

- the first ``n_shared`` heads are always on, weighted by ``n_shared * softmax(W_s x)`` (all 1 when
  there is one shared head);
- the other heads are routed: ``p = softmax(W_r x)``, keep the top-k, renormalise them to sum to 1
  and multiply by k, so that a kept head starts near weight 1, like plain multi-head attention;
- a two-way router ``2 * softmax(W_h x)`` balances the shared group against the routed group;
- a load-balance loss ``R^2 * mean_r(f_r * P_r)`` (f_r: fraction of tokens routed to head r, P_r: its
  mean router probability; SkyworkAI/MoH, coefficient 0.01) keeps the routed heads in use.

The module computes every head and zero-weights the unchosen ones: the output is exact, but the
compute saving of skipping heads (the paper's efficiency claim) needs a gathering kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .softmax import check_heads, merge_heads, softmax_attention, split_heads


def moh_gates(
    x: Tensor,
    w_routed: Tensor | None,
    w_shared: Tensor | None,
    w_mix: Tensor | None,
    *,
    n_shared: int,
    top_k: int,
) -> tuple[Tensor, Tensor]:
    """Per-token head weights and the load-balance loss.

    Args:
        x: (B, N, d_model) tokens that choose heads.
        w_routed: (R, d_model) routed-head router (None when R = 0).
        w_shared: (S, d_model) shared-head weighting (None when S <= 1: one shared head weighs 1).
        w_mix: (2, d_model) shared-vs-routed router (None unless both groups exist).
        n_shared: S, the number of shared heads (the first S heads).
        top_k: routed heads kept per token, 1 <= top_k <= R (0 when R = 0).

    Returns:
        gates (B, N, S + R), zero for unchosen routed heads; aux, the unscaled load-balance loss (0-dim).
    """
    b, n, _ = x.shape
    parts, aux = [], x.new_zeros(())
    g_routed = None
    if w_routed is not None:
        n_routed = w_routed.shape[0]
        p = torch.softmax(x @ w_routed.T, dim=-1)  # (B, N, R)
        chosen = F.one_hot(p.topk(top_k, dim=-1).indices, n_routed).sum(-2).to(p.dtype)  # (B, N, R) 0/1
        kept = p * chosen
        g_routed = kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).eps) * top_k
        f = chosen.reshape(-1, n_routed).mean(0)  # fraction of tokens sent to each routed head
        aux = (f * p.reshape(-1, n_routed).mean(0)).mean() * n_routed**2
    if n_shared:
        if w_shared is not None:
            g_shared = torch.softmax(x @ w_shared.T, dim=-1) * n_shared  # (B, N, S)
        else:
            g_shared = x.new_ones(b, n, n_shared)
        if g_routed is not None:
            mix = 2 * torch.softmax(x @ w_mix.T, dim=-1)  # (B, N, 2): shared group vs routed group
            g_shared, g_routed = g_shared * mix[..., :1], g_routed * mix[..., 1:]
        parts.append(g_shared)
    if g_routed is not None:
        parts.append(g_routed)
    return torch.cat(parts, dim=-1), aux


def moh_attention(q: Tensor, k: Tensor, v: Tensor, gates: Tensor, *, causal: bool = False) -> Tensor:
    """Softmax attention per head, each head's output scaled by its per-token gate.

    q (B, H, Nq, D), k/v (B, H, Nk, D), gates (B, Nq, H) -> (B, H, Nq, D).
    """
    want = (q.shape[0], q.shape[2], q.shape[1])
    if gates.shape != want:
        raise ValueError(f"`gates` must be (B, Nq, H) = {want}; got {tuple(gates.shape)=}")
    return softmax_attention(q, k, v, causal=causal) * gates.transpose(1, 2)[..., None]


def _weight(linear: nn.Linear | None) -> Tensor | None:
    return None if linear is None else linear.weight


class MoHAttention(nn.Module):
    """Mixture-of-Head attention with its own projections and routers (no bias).

    Paper: "MoH: Multi-Head Attention as Mixture-of-Head Attention" (paper 12).
    Shapes: x (B, N, d_model) -> (B, N, d_model); ``context`` (B, M, d_model) gives cross attention
    (the query tokens x choose the heads). After each forward, ``aux_loss`` holds
    ``aux_coef * load-balance loss`` (a 0-dim tensor in the graph) to add to the training loss.

    Args:
        n_shared: always-on heads (default n_heads // 2, as in MoH-LLaMA3's 50% shared heads).
        top_k: routed heads per token (default half the routed heads, >= 1; MoH-LLaMA3: 25% of all heads).
        aux_coef: weight of the load-balance loss (0.01 in the paper's code).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        causal: bool = False,
        n_shared: int | None = None,
        top_k: int | None = None,
        aux_coef: float = 0.01,
    ) -> None:
        super().__init__()
        check_heads(d_model, n_heads)
        n_shared = n_heads // 2 if n_shared is None else n_shared
        if not isinstance(n_shared, int) or not 0 <= n_shared <= n_heads:
            raise ValueError(f"`n_shared` must be an integer in [0, n_heads={n_heads}]; got {n_shared=}")
        n_routed = n_heads - n_shared
        top_k = (max(1, n_routed // 2) if n_routed else 0) if top_k is None else top_k
        if n_routed and (not isinstance(top_k, int) or not 1 <= top_k <= n_routed):
            raise ValueError(f"`top_k` must be in [1, routed heads={n_routed}] (n_heads={n_heads}, "
                             f"n_shared={n_shared}); got {top_k=}")
        if not n_routed and top_k:
            raise ValueError(f"`top_k` must be 0 when every head is shared (n_shared == n_heads); got {top_k=}")
        if not isinstance(aux_coef, (int, float)) or aux_coef < 0:
            raise ValueError(f"`aux_coef` must be a non-negative number; got {aux_coef=}")
        self.d_model, self.n_heads, self.causal = d_model, n_heads, causal
        self.n_shared, self.n_routed, self.top_k, self.aux_coef = n_shared, n_routed, top_k, float(aux_coef)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.router = nn.Linear(d_model, n_routed, bias=False) if n_routed else None
        self.shared_router = nn.Linear(d_model, n_shared, bias=False) if n_shared > 1 else None
        self.mix_router = nn.Linear(d_model, 2, bias=False) if n_shared and n_routed else None
        self.aux_loss: Tensor = torch.zeros(())

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N, H) head weights and the unscaled load-balance loss for tokens x (B, N, d_model)."""
        return moh_gates(x, _weight(self.router), _weight(self.shared_router), _weight(self.mix_router),
                         n_shared=self.n_shared, top_k=self.top_k)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        src = x if context is None else context
        q = split_heads(self.q_proj(x), self.n_heads)  # (B, H, N, D)
        k = split_heads(self.k_proj(src), self.n_heads)  # (B, H, M, D)
        v = split_heads(self.v_proj(src), self.n_heads)
        gates, aux = self.gates(x)
        self.aux_loss = self.aux_coef * aux
        return self.o_proj(merge_heads(moh_attention(q, k, v, gates, causal=self.causal)))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads} (shared={self.n_shared}, routed={self.n_routed}, "
                f"top_k={self.top_k}), causal={self.causal}, aux_coef={self.aux_coef}")


def main() -> None:
    """Toy run on CPU: which heads each token uses, and the load-balance loss."""
    torch.manual_seed(0)
    m = MoHAttention(32, 8, causal=True).requires_grad_(False)
    x = torch.randn(1, 5, 32)
    gates, aux = m.gates(x)
    print(m)
    print("active heads per token:", (gates[0] > 0).int().tolist(), f"load-balance loss {float(aux):.3f}")


if __name__ == "__main__":
    main()
