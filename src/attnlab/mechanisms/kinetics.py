"""Kinetics' block top-k sparse attention for decoding, and its cost model in eFLOPs.

Paper: "Kinetics: Rethinking Test-Time Scaling Laws" (paper 44, https://arxiv.org/abs/2506.05333).
Each query keeps the first ``sinks`` tokens, a local window of its ``window`` latest tokens, and
the ``topk`` key blocks of ``block`` tokens with the highest logits averaged over the block and
over the query heads of its GQA group (one selection per KV head, so the group reads one set of
blocks). The paper simulates this with masks, as this file does: the saving it models is memory
traffic at decode time, which ``decode_cost`` counts. A last, partial block is scored over the
tokens it has, so decoding may grow the cache one token at a time.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .routing import causal_mask, masked_attention
from .softmax import check_heads, merge_heads, split_heads

E_MEMORY = 562.5  # eFLOPs per byte of memory traffic in the paper's cost model (H100: FLOP/s over bytes/s)


def block_scores(q: Tensor, k: Tensor, block: int, *, causal: bool = True) -> Tensor:
    """Mean logit per key block, averaged over the GQA group and the block's visible keys.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D) -> (B, Hkv, Nq, ceil(Nk / block)); blocks with no
    visible key score -inf.
    """
    b, hq, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    logits = q.unflatten(1, (h_kv, hq // h_kv)) @ k[:, :, None].transpose(-1, -2) / math.sqrt(d)
    logits = logits.mean(2)  # (B, Hkv, Nq, Nk): one score per KV head
    visible = causal_mask(n_q, n_k, q.device) if causal else torch.ones(n_q, n_k, dtype=torch.bool, device=q.device)
    pad = -n_k % block
    sums = nn.functional.pad(logits * visible, (0, pad)).unflatten(-1, (-1, block)).sum(-1)
    counts = nn.functional.pad(visible.to(q.dtype), (0, pad)).unflatten(-1, (-1, block)).sum(-1)
    return (sums / counts.clamp_min(1)).masked_fill(counts == 0, float("-inf"))


def block_topk_mask(q: Tensor, k: Tensor, *, block: int, topk: int, sinks: int = 4, window: int = 16,
                    causal: bool = True) -> Tensor:
    """The Kinetics selection: sinks | local window | top-k blocks, within the visible keys (causal).

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D) -> (B, Hq, Nq, Nk) bool (equal within a GQA group).
    Query i sits at key position i + Nk - Nq (bottom-right, as in decoding).
    """
    n_q, n_k = q.shape[2], k.shape[2]
    if block < 1:
        raise ValueError(f"`block` must be >= 1; got {block=}")
    n_blocks = -(-n_k // block)
    if not 1 <= topk <= n_blocks:
        raise ValueError(f"`topk` must be in [1, number of key blocks]; got {topk=}, number of key blocks={n_blocks}")
    if sinks < 0 or window < 0:
        raise ValueError(f"`sinks` and `window` must be >= 0; got {sinks=}, {window=}")
    scores = block_scores(q, k, block, causal=causal)
    top, idx = scores.topk(topk, -1)
    picked = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, top > float("-inf"))
    mask = picked.repeat_interleave(block, -1)[..., :n_k]  # (B, Hkv, Nq, Nk)
    pos_q = torch.arange(n_q, device=q.device)[:, None] + n_k - n_q
    pos_k = torch.arange(n_k, device=q.device)
    dist = pos_q - pos_k
    local = (dist >= 0) & (dist < window) if causal else dist.abs() < window  # noncausal: both sides
    mask = mask | (pos_k < sinks) | local
    if causal:
        mask = mask & (pos_k <= pos_q)
    return mask.repeat_interleave(q.shape[1] // k.shape[1], 1)


def block_topk_attention(q: Tensor, k: Tensor, v: Tensor, *, block: int, topk: int, sinks: int = 4,
                         window: int = 16, causal: bool = True) -> tuple[Tensor, Tensor]:
    """Softmax attention on the Kinetics selection. q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D)
    -> (out (B, Hq, Nq, Dv), mask (B, Hq, Nq, Nk))."""
    mask = block_topk_mask(q, k, block=block, topk=topk, sinks=sinks, window=window, causal=causal)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return masked_attention(q, k, v, mask), mask


def decode_cost(n_params: float, l_ctx: int, l_gen: int, *, n_layers: int, h_q: int, h_kv: int, head_dim: int,
                trials: int = 1, block: int | None = None, topk: int | None = None, local: int = 0,
                e_memory: float = E_MEMORY) -> dict[str, float]:
    """Cost of generating ``l_gen`` tokens after ``l_ctx`` in ``trials`` samples, in eFLOPs.

    eFLOPs = compute + e_memory * memory bytes (bf16, 2 bytes per element). Dense: compute is
    trials * (2 P L_gen + 2 (2 L_ctx + L_gen) L_gen Hq d layers); memory reads the shared context's
    KV once per step for all trials and each trial's own new KV: 2 (2 L_ctx + trials L_gen) L_gen
    Hkv d layers (parameter traffic left out, as in the paper's code). Block top-k (``block`` and
    ``topk`` given): each step attends to at most B = local + block * topk tokens, so the KV term
    becomes F = sum_t min(B, L_ctx + t) tokens per trial (B L_gen - max(0, B - L_ctx)^2 / 2 while
    B - L_ctx <= L_gen), plus scoring the block means,
    (2 L_ctx + L_gen) / block * L_gen elements. Returns compute, memory and eflops.
    """
    for name, val in dict(l_ctx=l_ctx, l_gen=l_gen, n_layers=n_layers, h_q=h_q, h_kv=h_kv, head_dim=head_dim,
                          trials=trials).items():
        if val < 0 or (name != "l_ctx" and val < 1):
            raise ValueError(f"`{name}` must be >= 1 (l_ctx >= 0); got {name}={val}")
    if (block is None) != (topk is None):
        raise ValueError(f"give both `block` and `topk` for block top-k, or neither for dense; got {block=}, {topk=}")
    per = h_q * head_dim * n_layers
    per_kv = h_kv * head_dim * n_layers
    if block is None:
        compute = trials * (2 * n_params * l_gen + 2 * (2 * l_ctx + l_gen) * l_gen * per)
        memory = 2 * (2 * l_ctx + trials * l_gen) * l_gen * per_kv
    else:
        if block < 1 or topk < 1 or local < 0:
            raise ValueError(f"`block`, `topk` must be >= 1 and `local` >= 0; got {block=}, {topk=}, {local=}")
        budget = local + block * topk
        # sum over steps t of min(B, L_ctx + t); the paper's B L_gen - (B - L_ctx)^2 / 2 is its case
        # B - L_ctx <= L_gen, and it undercounts when the budget outgrows the whole sequence.
        grow = min(max(0, budget - l_ctx), l_gen)  # steps that still see fewer than B tokens
        kv = grow * l_ctx + 0.5 * grow**2 + (l_gen - grow) * budget
        search = (2 * l_ctx + l_gen) / block * l_gen
        compute = trials * (2 * n_params * l_gen + 4 * kv * per + search * per)
        memory = trials * (4 * kv * per_kv + search * per_kv)
    return dict(compute=compute, memory=memory, eflops=compute + e_memory * memory)


class KineticsAttention(nn.Module):
    """Block top-k sparse attention as in Kinetics (paper 44). Shapes: x (B, N, d_model) -> (B, N, d_model).

    Every query (each position of a causal sequence is one decoding step) uses the selection of
    ``block_topk_mask``. ``n_kv_heads`` < ``n_heads`` gives GQA, the setting the group-averaged
    block scores are made for. top-k is min(topk, number of key blocks) for short sequences.
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool = True, block: int = 4, topk: int = 2,
                 sinks: int = 4, window: int = 4, n_kv_heads: int | None = None) -> None:
        super().__init__()
        check_heads(d_model, n_heads)
        n_kv_heads = n_kv_heads or n_heads
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"`n_kv_heads` must divide `n_heads`; got {n_kv_heads=}, {n_heads=}")
        if block < 1 or topk < 1 or sinks < 0 or window < 0:
            raise ValueError(f"need `block`, `topk` >= 1 and `sinks`, `window` >= 0; got {block=}, {topk=}, {sinks=}, {window=}")
        self.d_model, self.n_heads, self.n_kv_heads, self.causal = d_model, n_heads, n_kv_heads, causal
        self.block, self.topk, self.sinks, self.window = block, topk, sinks, window
        kv_dim = d_model // n_heads * n_kv_heads
        self.q_proj, self.o_proj = nn.Linear(d_model, d_model, bias=False), nn.Linear(d_model, d_model, bias=False)
        self.k_proj, self.v_proj = nn.Linear(d_model, kv_dim, bias=False), nn.Linear(d_model, kv_dim, bias=False)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        src = x if context is None else context
        q = split_heads(self.q_proj(x), self.n_heads)  # (B, Hq, N, D)
        k = split_heads(self.k_proj(src), self.n_kv_heads)  # (B, Hkv, M, D)
        v = split_heads(self.v_proj(src), self.n_kv_heads)
        topk = min(self.topk, -(-k.shape[2] // self.block))
        out, _ = block_topk_attention(q, k, v, block=self.block, topk=topk, sinks=self.sinks, window=self.window,
                                      causal=self.causal)
        return self.o_proj(merge_heads(out))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, causal={self.causal}, "
                f"block={self.block}, topk={self.topk}, sinks={self.sinks}, window={self.window}")


def main() -> None:
    """Toy run on CPU: one decoding query's selection over 40 cached tokens, and dense vs top-k cost at 32K."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 40, 8)
    print("".join(".#"[b] for b in block_topk_mask(q, k, block=8, topk=2, sinks=4, window=6)[0, 0, 0].int().tolist()))
    shape = dict(n_layers=28, h_q=16, h_kv=8, head_dim=128)
    dense = decode_cost(0.6e9, 32768, 8192, **shape)["eflops"]
    sparse = decode_cost(0.6e9, 32768, 8192, block=16, topk=64, local=64, **shape)["eflops"]
    print(f"dense {dense:.3g} eFLOPs, block top-k {sparse:.3g} eFLOPs ({dense / sparse:.1f}x)")


if __name__ == "__main__":
    main()
