"""Flow-Attention: linear attention normalised by conserving the flow into sinks and out of sources.

Paper: "Flowformer: Linearizing Transformers with Conservation Flows" (Wu et al., ICML 2022,
arXiv 2202.06258; paper 33).

Attention is a flow network: values flow from m sources (keys) to n sinks (queries) through
capacities ``phi(Q_i) . phi(K_j)`` with ``phi = sigmoid`` (non-negative). With ``A = phi(Q) phi(K)^T``
(never formed; every sum below costs O((n + m) D))::

    I_i = sum_j A_ij                    incoming flow of sink i
    O_j = sum_i A_ij                    outgoing flow of source j
    I^_i = sum_j A_ij / O_j             incoming flow when each source sends out exactly 1
    O^_j = sum_i A_ij / I_i             outgoing flow when each sink receives exactly 1
    competition:  V^ = softmax_j(O^) * m  (*)  V   sources compete for a fixed total outflow
    aggregation:  R_i = sum_j A_ij V^_j / I_i
    allocation:   out_i = sigmoid(I^_i * n / m) * R_i

``O^`` is clipped to [-1, 1] before the softmax (a stability clamp of the authors' code; O^ > 0).

Causal form (the paper's autoregressive variant): every sum over sources runs over j <= i only,
every sum over sinks over i <= j only, and each is divided by its term count (position t + 1, so
flows stay comparable along the sequence); competition becomes a running softmax
``exp(O^_t) / sum_{s<=t} exp(O^_s) * (t + 1)``, and allocation is ``sigmoid(I^_i)``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .lightning import lightning_attention, running_sum
from .softmax import check_heads, merge_heads, split_heads


def _check(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"`{name}` must be (B, H, N, D); got {name}.shape={tuple(t.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k, v must share (B, H), k and v N, q and k D; got {q.shape=}, {k.shape=}, {v.shape=}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal flow attention is self-attention (Nq == Nk); got {q.shape[2]=}, {k.shape[2]=}")


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise dot product of (B, H, N, D) tensors (y may be (B, H, 1, D)) -> (B, H, N)."""
    return (x * y).sum(-1)


def flow_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, eps: float = 1e-6) -> Tensor:
    """Flow-Attention on non-negative features (see the module docstring for the equations).

    Args:
        q: (B, H, N, D) sink features ``phi(Q) >= 0``.
        k: (B, H, M, D) source features ``phi(K) >= 0``; M != N is cross attention (non-causal only).
        v: (B, H, M, Dv) values.
        causal: the autoregressive form (N == M).
        eps: added to every flow before it divides, so near-zero features cannot divide by zero.

    Returns:
        (B, H, N, Dv) in q's dtype.
    """
    _check(q, k, v, causal)
    if causal:
        return _causal(q, k, v, eps)
    n, m = q.shape[2], k.shape[2]
    incoming = _dot(q, k.sum(2, keepdim=True)) + eps  # (B, H, N)
    outgoing = _dot(k, q.sum(2, keepdim=True)) + eps  # (B, H, M)
    conserved_in = _dot(q, (k / outgoing.unsqueeze(-1)).sum(2, keepdim=True))
    conserved_out = _dot(k, (q / incoming.unsqueeze(-1)).sum(2, keepdim=True)).clamp(-1.0, 1.0)
    competition = torch.softmax(conserved_out, dim=-1) * m  # (B, H, M)
    allocation = torch.sigmoid(conserved_in * (n / m))  # (B, H, N)
    aggregated = q @ (k.transpose(-1, -2) @ (v * competition.unsqueeze(-1)))  # (B, H, N, Dv)
    return aggregated * (allocation / incoming).unsqueeze(-1)


def _causal(q: Tensor, k: Tensor, v: Tensor, eps: float) -> Tensor:
    count = torch.arange(1, q.shape[2] + 1, device=q.device, dtype=q.dtype)  # terms in each running sum
    incoming = _dot(q, running_sum(k)) / count + eps  # (B, H, N): mean inflow of sink t from s <= t
    outgoing = _dot(k, running_sum(q)) / count + eps
    conserved_in = _dot(q, running_sum(k / outgoing.unsqueeze(-1))) / count
    conserved_out = (_dot(k, running_sum(q / incoming.unsqueeze(-1))) / count).clamp(-1.0, 1.0)
    weight = torch.exp(conserved_out)  # <= e: the clamp keeps the running softmax finite
    competition = weight / weight.cumsum(-1) * count
    allocation = torch.sigmoid(conserved_in)
    # sum_{s <= t} (q_t . k_s) c_s v_s is causal linear attention: lightning's tiled kernel runs it.
    aggregated = lightning_attention(q, k, v * competition.unsqueeze(-1), causal=True)
    return aggregated * (allocation / (incoming * count)).unsqueeze(-1)


class FlowAttention(nn.Module):
    """Flowformer's Flow-Attention layer: sigmoid features, flow-conserving normalisation.

    Paper: "Flowformer: Linearizing Transformers with Conservation Flows" (paper 33).
    Shapes: x (B, N, d_model) -> (B, N, d_model); ``context`` (B, M, d_model) gives cross attention
    (sinks from x, sources from context; non-causal only, as in the paper).

    Args:
        causal: the autoregressive form.
        eps: stabiliser added to flows before division.
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        check_heads(d_model, n_heads)
        if not eps >= 0:
            raise ValueError(f"`eps` must be >= 0; got {eps=}")
        self.d_model, self.n_heads, self.causal, self.eps = d_model, n_heads, causal, eps
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if context is not None and self.causal:
            raise ValueError("causal FlowAttention has no cross form; got a `context` with causal=True")
        src = x if context is None else context
        q = split_heads(torch.sigmoid(self.q_proj(x)), self.n_heads)  # (B, H, N, D)
        k = split_heads(torch.sigmoid(self.k_proj(src)), self.n_heads)  # (B, H, M, D)
        v = split_heads(self.v_proj(src), self.n_heads)
        return self.o_proj(merge_heads(flow_attention(q, k, v, causal=self.causal, eps=self.eps)))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}, eps={self.eps}"


def main() -> None:
    """Toy run on CPU: a causal layer leaves past outputs alone when the future changes."""
    torch.manual_seed(0)
    m = FlowAttention(16, 4, causal=True)
    x = torch.randn(1, 8, 16)
    x2 = x.clone()
    x2[:, -1] += 1.0
    print(m, "past unchanged:", torch.allclose(m(x)[:, :-1], m(x2)[:, :-1]))


if __name__ == "__main__":
    main()
