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

POSITIONS = ("sinusoidal", "learned", "onehot")


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
    """Multi-head positional attention: positional q/k projections, value and output projections.

    Paper: "Positional Attention: Expressivity and Learnability of Algorithmic Computation" (paper 42).
    As in the paper's code (opallab/positional_attention ``model.py``), every head projects the full
    positional encoding (its q/k head dim is ``d_pos``, scores scaled by 1/sqrt(d_pos)) and all
    projections carry a bias. Shapes: x (B, N, d_model) -> (B, N, d_model). Positions are each
    token's index in its own sequence; with ``context`` (B, M, d_model) the values come from the
    context and the weights from positions 0..N-1 (queries) against 0..M-1 (keys), bottom-right
    aligned when causal.

    Args:
        positions: "onehot" (the paper's identity encodings; ``d_pos = max_len``), "sinusoidal"
            (fixed, any length) or "learned" (a table of ``max_len`` rows).
        d_pos: width of the sinusoidal or learned encodings; default d_model.
        max_len: rows of the one-hot or learned table; longer inputs raise ValueError.
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
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"`max_len` must be a positive integer; got {max_len=}")
        if positions == "onehot":
            if d_pos not in (None, max_len):
                raise ValueError(f"one-hot encodings are max_len wide; got {d_pos=}, {max_len=}")
            d_pos = max_len
        d_pos = d_model if d_pos is None else d_pos
        if not isinstance(d_pos, int) or d_pos < 1 or (positions == "sinusoidal" and d_pos % 2):
            raise ValueError(f"`d_pos` must be a positive integer (even for sinusoidal); got {d_pos=}")
        self.d_model, self.n_heads, self.causal = d_model, n_heads, causal
        self.positions, self.d_pos, self.max_len = positions, d_pos, max_len
        if positions == "learned":
            self.table = nn.Parameter(torch.randn(max_len, d_pos) * d_pos**-0.5)
        self.q_proj = nn.Linear(d_pos, n_heads * d_pos)  # acts on P, never on x
        self.k_proj = nn.Linear(d_pos, n_heads * d_pos)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def encodings(self, n: int, like: Tensor) -> Tensor:
        """(n, d_pos) positional encodings of positions 0..n-1."""
        if self.positions == "sinusoidal":
            return sinusoidal_positions(n, self.d_pos, device=like.device, dtype=like.dtype)
        if n > self.max_len:
            raise ValueError(f"sequence length {n} exceeds the {self.positions} table; got {n=}, {self.max_len=}")
        if self.positions == "onehot":
            return torch.eye(self.max_len, device=like.device, dtype=like.dtype)[:n]
        return self.table[:n].to(like.dtype)

    def projected_positions(self, n_q: int, n_kv: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(H, Nq, d_pos) query and (H, Nk, d_pos) key projections of the positions: the scores' only input."""
        p_q = self.q_proj(self.encodings(n_q, like)).view(n_q, self.n_heads, self.d_pos).transpose(0, 1)
        p_k = self.k_proj(self.encodings(n_kv, like)).view(n_kv, self.n_heads, self.d_pos).transpose(0, 1)
        return p_q, p_k

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        src = x if context is None else context
        p_q, p_k = self.projected_positions(x.shape[1], src.shape[1], x)
        v = split_heads(self.v_proj(src), self.n_heads)  # (B, H, M, D)
        return self.o_proj(merge_heads(positional_attention(p_q, p_k, v, causal=self.causal)))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}, "
                f"positions={self.positions!r}, d_pos={self.d_pos}")


def main() -> None:
    """Toy run on CPU: the attention map is a function of positions only (the same for every input)."""
    torch.manual_seed(0)
    m = PositionalAttention(16, 2, causal=True, positions="onehot", max_len=6).requires_grad_(False)
    p_q, p_k = m.projected_positions(6, 6, torch.zeros(()))
    a = positional_attention(p_q, p_k, torch.eye(6).expand(1, 2, 6, 6), causal=True)  # v = I shows the map
    print("head 0 attention map (rows: queries), %:")
    print((a[0, 0] * 100).round().int())


if __name__ == "__main__":
    main()
