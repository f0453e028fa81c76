"""Positional attention: the attention weights come from positional encodings only; the values from the input.

Paper: "Positional Attention: Expressivity and Learnability of Algorithmic Computation" (de Luca,
Giapitzakis, Yang, Veličković, Fountoulakis; arXiv 2410.01686; paper 42). Each layer computes
``A = softmax((P W_Q)(P W_K)^T / sqrt(d))`` from the same positional encodings P at every layer and
mixes the input's values ``X W_V`` with it. Because A never sees the data, what the layer routes
where is fixed per position, like a parallel algorithm's communication pattern; the paper shows
this is as expressive as parallel computation models and generalises better to unseen value ranges.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..core.patterns import causal as causal_pattern
from ..kernels import attention
from .softmax import check_heads, merge_heads, split_heads

POSITIONS = ("sinusoidal", "learned")


def sinusoidal_positions(n: int, dim: int, *, device=None, dtype=torch.float32) -> Tensor:
    """Fixed sinusoidal encodings (N, dim) of positions 0..n-1 ("Attention Is All You Need", §3.5)."""
    pos = torch.arange(n, device=device, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)
    enc = torch.zeros(n, dim, device=device, dtype=torch.float64)
    enc[:, 0::2] = torch.sin(pos * freq)
    enc[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return enc.to(dtype)


def positional_attention(p_q: Tensor, p_k: Tensor, v: Tensor, *, causal: bool = False) -> Tensor:
    """``softmax(p_q p_k^T / sqrt(D)) v``: scores from positions only, one map shared by the batch.

    Args:
        p_q: (H, Nq, D) projected query positions. p_k: (H, Nk, D) projected key positions.
        v: (B, H, Nk, Dv) values from the input.
        causal: bottom-right aligned causal mask (query i sees keys j <= i + Nk - Nq).

    Returns:
        (B, H, Nq, Dv).
    """
    if p_q.dim() != 3 or p_k.dim() != 3:
        raise ValueError(f"`p_q`, `p_k` must be (H, N, D); got {tuple(p_q.shape)=}, {tuple(p_k.shape)=}")
    b = v.shape[0]
    q = p_q.unsqueeze(0).expand(b, *p_q.shape)  # (B, H, Nq, D): a view, the batch shares positions
    k = p_k.unsqueeze(0).expand(b, *p_k.shape)
    return attention(q, k, v, pattern=causal_pattern() if causal else None)


class PositionalAttention(nn.Module):
    """Multi-head positional attention with its own positional q/k projections and value/output projections.

    Paper: "Positional Attention: Expressivity and Learnability of Algorithmic Computation" (paper 42).
    Shapes: x (B, N, d_model) -> (B, N, d_model). Positions are each token's index in its own
    sequence; with ``context`` (B, M, d_model) the values come from the context and the weights from
    positions 0..N-1 (queries) against 0..M-1 (keys), bottom-right aligned when causal.

    Args:
        positions: "sinusoidal" (fixed, any length) or "learned" (a table of ``max_len`` rows).
        d_pos: width of the positional encodings; default d_model.
        max_len: rows of the learned table; longer inputs raise ValueError.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        causal: bool = False,
        positions: str = "sinusoidal",
        d_pos: int | None = None,
        max_len: int = 1024,
    ) -> None:
        super().__init__()
        check_heads(d_model, n_heads)
        if positions not in POSITIONS:
            raise ValueError(f"`positions` must be one of {POSITIONS}; got {positions=}")
        d_pos = d_model if d_pos is None else d_pos
        if not isinstance(d_pos, int) or d_pos < 2 or d_pos % 2:
            raise ValueError(f"`d_pos` must be an even integer >= 2; got {d_pos=}")
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"`max_len` must be a positive integer; got {max_len=}")
        self.d_model, self.n_heads, self.causal = d_model, n_heads, causal
        self.positions, self.d_pos, self.max_len = positions, d_pos, max_len
        if positions == "learned":
            self.table = nn.Parameter(torch.randn(max_len, d_pos) * d_pos**-0.5)
        self.q_proj = nn.Linear(d_pos, d_model, bias=False)  # acts on P, never on x
        self.k_proj = nn.Linear(d_pos, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def encodings(self, n: int, like: Tensor) -> Tensor:
        """(n, d_pos) positional encodings of positions 0..n-1."""
        if self.positions == "sinusoidal":
            return sinusoidal_positions(n, self.d_pos, device=like.device, dtype=like.dtype)
        if n > self.max_len:
            raise ValueError(f"sequence length {n} exceeds the learned table; got {n=}, {self.max_len=}")
        return self.table[:n].to(like.dtype)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        src = x if context is None else context
        p_q = split_heads(self.q_proj(self.encodings(x.shape[1], x))[None], self.n_heads)[0]  # (H, N, D)
        p_k = split_heads(self.k_proj(self.encodings(src.shape[1], x))[None], self.n_heads)[0]  # (H, M, D)
        v = split_heads(self.v_proj(src), self.n_heads)  # (B, H, M, D)
        return self.o_proj(merge_heads(positional_attention(p_q, p_k, v, causal=self.causal)))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}, "
                f"positions={self.positions!r}, d_pos={self.d_pos}")


def main() -> None:
    """Toy run on CPU: the same attention map for two unrelated inputs (it depends on positions only)."""
    torch.manual_seed(0)
    m = PositionalAttention(16, 2, causal=True)
    eye = torch.eye(6)[None].expand(1, 6, 6)
    p_q = split_heads(m.q_proj(m.encodings(6, eye))[None], 2)[0]
    p_k = split_heads(m.k_proj(m.encodings(6, eye))[None], 2)[0]
    a = positional_attention(p_q, p_k, torch.eye(6).expand(1, 2, 6, 6), causal=True)
    print("head 0 attention map (rows: queries):")
    print((a[0, 0] * 100).round().int())


if __name__ == "__main__":
    main()
