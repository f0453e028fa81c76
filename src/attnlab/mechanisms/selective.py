"""Selective self-attention: a learned inverse temperature per query (token- and position-aware) and per value.

Paper: "Selective Attention: Enhancing Transformer through Principled Context Control" (Zhang,
Chang, Li, Roy-Chowdhury, Chen, Oymak; NeurIPS 2024, arXiv 2411.12892; paper 20). Softmax treats
every query alike; SSA scales each query by an inverse temperature so that each token can choose how
sparse its attention is, and scales each value so that noisy tokens can be suppressed:

    out_i = sum_j softmax_j((tau_q(x_i, n_i) q_i) . k_j / sqrt(d)) * tau_v(x_j) v_j

- query temperature, position part: ``tau_pos(n) = 1 + sigmoid(alpha_h) * log(n)`` with n the
  number of keys query i can see; it counters attention dilution, since softmax over n keys
  flattens as n grows (log-n scaling).
- query temperature, token part: ``tau_tok(x) = tanh(f_h(x))``; the two parts add, so tau_q > 0.
  With ``weight_sharing`` (the paper's <0.5%-parameter variant) f_h reuses the head's query,
  ``f_h(x) = <W_q x>_h . u_h``; otherwise f is its own linear map d_model -> H.
- value temperature (token part): ``tau_v(x_j) = 1 + tanh(g_h(x_j))``, sharing the value projection likewise.

attnlab's choices where not restated here: the paper ablates position-aware value temperature too;
this module's value temperature is token-aware only. The token parts start at 0 (tau_tok = 0,
tau_v = 1) and alpha at 0, so a fresh layer is softmax attention with log-n query scaling.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .softmax import check_heads, merge_heads, softmax_attention, split_heads


def visible_keys(n_q: int, n_kv: int, *, causal: bool, device=None) -> Tensor:
    """(Nq,) number of keys each query sees: Nk, or i + 1 + (Nk - Nq) clipped to [0, Nk] when causal."""
    if not causal:
        return torch.full((n_q,), n_kv, device=device)
    return (torch.arange(n_q, device=device) + 1 + n_kv - n_q).clamp(0, n_kv)


def position_temperature(alpha: Tensor, n_visible: Tensor) -> Tensor:
    """(H, Nq) ``1 + sigmoid(alpha_h) log(n_i)``; alpha (H,), n_visible (Nq,) (n < 1 counts as 1)."""
    log_n = n_visible.clamp_min(1).to(alpha.dtype).log()
    return 1 + torch.sigmoid(alpha)[:, None] * log_n[None, :]


def selective_attention(
    q: Tensor, k: Tensor, v: Tensor, tau_q: Tensor, tau_v: Tensor | None = None, *, causal: bool = False
) -> Tensor:
    """``softmax((tau_q q) k^T / sqrt(D)) (tau_v v)``: per-query and per-value inverse temperatures.

    Args:
        q: (B, H, Nq, D). k: (B, H, Nk, D). v: (B, H, Nk, Dv).
        tau_q: (B, H, Nq) query inverse temperatures. tau_v: (B, H, Nk) value scales, or None (all 1).
        causal: bottom-right aligned causal mask.

    Returns:
        (B, H, Nq, Dv).
    """
    if tau_q.shape != q.shape[:3]:
        raise ValueError(f"`tau_q` must be (B, H, Nq) = {tuple(q.shape[:3])}; got {tuple(tau_q.shape)=}")
    if tau_v is not None and tau_v.shape != v.shape[:3]:
        raise ValueError(f"`tau_v` must be (B, H, Nk) = {tuple(v.shape[:3])}; got {tuple(tau_v.shape)=}")
    v = v if tau_v is None else v * tau_v[..., None]
    return softmax_attention(q * tau_q[..., None], k, v, causal=causal)


class SelectiveAttention(nn.Module):
    """Multi-head selective self-attention (SSA) with its own projections and temperature parameters.

    Paper: "Selective Attention: Enhancing Transformer through Principled Context Control" (paper 20).
    Shapes: x (B, N, d_model) -> (B, N, d_model); ``context`` (B, M, d_model) gives cross attention
    (query temperatures from x, value temperatures from the context).

    Args:
        value_temperature: scale values by tau_v (the paper's value selectivity).
        weight_sharing: token temperatures read the head's own query / value (H * head_dim extra
            parameters each); False gives them their own d_model -> H linear maps.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        causal: bool = False,
        value_temperature: bool = True,
        weight_sharing: bool = True,
    ) -> None:
        super().__init__()
        check_heads(d_model, n_heads)
        self.d_model, self.n_heads, self.causal = d_model, n_heads, causal
        self.value_temperature, self.weight_sharing = bool(value_temperature), bool(weight_sharing)
        head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.alpha = nn.Parameter(torch.zeros(n_heads))  # sigmoid(0) = 0.5: half log-n scaling at start
        if weight_sharing:
            self.u_q = nn.Parameter(torch.zeros(n_heads, head_dim))  # zero: tau_tok starts at 0
            self.u_v = nn.Parameter(torch.zeros(n_heads, head_dim)) if value_temperature else None
        else:
            self.f_q = nn.Linear(d_model, n_heads, bias=False)
            self.f_v = nn.Linear(d_model, n_heads, bias=False) if value_temperature else None
            nn.init.zeros_(self.f_q.weight)
            if self.f_v is not None:
                nn.init.zeros_(self.f_v.weight)

    def _token_logit(self, x: Tensor, heads: Tensor, which: str) -> Tensor:
        """(B, H, N) f_h(x): from the head's own projection (weight sharing) or a separate linear map."""
        if self.weight_sharing:
            u = self.u_q if which == "q" else self.u_v
            return torch.einsum("bhnd,hd->bhn", heads, u)
        f = self.f_q if which == "q" else self.f_v
        return f(x).transpose(1, 2)

    def temperatures(self, x: Tensor, q: Tensor, src: Tensor, v: Tensor) -> tuple[Tensor, Tensor | None]:
        """tau_q (B, H, Nq) and tau_v (B, H, Nk) or None, for q (B, H, Nq, D) and v (B, H, Nk, D)."""
        n_vis = visible_keys(q.shape[2], v.shape[2], causal=self.causal, device=q.device)
        tau_q = position_temperature(self.alpha, n_vis).to(q.dtype) + torch.tanh(self._token_logit(x, q, "q"))
        tau_v = 1 + torch.tanh(self._token_logit(src, v, "v")) if self.value_temperature else None
        return tau_q, tau_v

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        src = x if context is None else context
        q = split_heads(self.q_proj(x), self.n_heads)  # (B, H, N, D)
        k = split_heads(self.k_proj(src), self.n_heads)  # (B, H, M, D)
        v = split_heads(self.v_proj(src), self.n_heads)
        tau_q, tau_v = self.temperatures(x, q, src, v)
        return self.o_proj(merge_heads(selective_attention(q, k, v, tau_q, tau_v, causal=self.causal)))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}, "
                f"value_temperature={self.value_temperature}, weight_sharing={self.weight_sharing}")


def main() -> None:
    """Toy run on CPU: the position part of the query temperature grows like log n along a causal sequence."""
    m = SelectiveAttention(16, 2, causal=True).requires_grad_(False)
    x = torch.randn(1, 8, 16)
    q, v = split_heads(m.q_proj(x), 2), split_heads(m.v_proj(x), 2)
    tau_q, _ = m.temperatures(x, q, x, v)
    print("tau_q of head 0 by position:", [round(float(t), 3) for t in tau_q[0, 0]])
    print(m, tuple(m(x).shape))


if __name__ == "__main__":
    main()
