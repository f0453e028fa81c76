"""Block-sparse prefill through ``attnlab.attach``: SeerAttention gates vs oracle top-k vs sliding window.

Paper: "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs" (Gao et al., 2024); the
comparison at equal density follows "The Sparse Frontier: Sparse Attention Trade-offs in Transformer LLMs".

Every selection is (B, Hkv, Qb, Kb) bool: one per GQA group, inside the causal block region, with the
diagonal block always kept (so every query row keeps at least itself). On CPU the selection runs as a
-1e9 logit bias outside the chosen tiles (quality only; the fused block-sparse kernel is timed on GPU).
"""
from __future__ import annotations

import torch

from ..interventions.base import Modifier
from ..probes.base import CallContext
from .seer import NEG, _check_block, causal_blocks


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top-k must be a positive int (blocks per query block), got {k=}")


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, H, Qb, Kb) bool: the diagonal block plus the k - 1 best-scored causal blocks of each row."""
    _check_k(k)
    qb, kb = scores.shape[-2:]
    causal = causal_blocks(qb, scores.device)
    s = scores.float().masked_fill(~causal, float("-inf"))
    s = s.masked_fill(torch.eye(qb, kb, dtype=torch.bool, device=scores.device), float("inf"))
    idx = s.topk(min(k, kb), dim=-1).indices
    sel = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
    return sel & causal  # rows with fewer than k causal blocks picked some -inf ones: drop them


def topk_density(n_blocks: int, k: int) -> float:
    """Fraction of the n_blocks * (n_blocks + 1) / 2 causal blocks that top-k (or a k-block window) keeps."""
    _check_k(k)
    return sum(min(i, k) for i in range(1, n_blocks + 1)) / (n_blocks * (n_blocks + 1) / 2)


def select_threshold(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, H, Qb, Kb) bool: causal blocks whose gate probability is >= ``threshold``, plus the diagonal."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be a float in (0, 1), got {threshold=}")
    qb = probs.shape[-2]
    causal = causal_blocks(qb, probs.device)
    return ((probs >= threshold) | torch.eye(qb, dtype=torch.bool, device=probs.device)) & causal


def select_window(n_blocks: int, k: int, device=None) -> torch.Tensor:
    """(Qb, Kb) bool: each query block keeps itself and its k - 1 previous key blocks."""
    _check_k(k)
    i = torch.arange(n_blocks, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < k)


def select_sink_window(n_blocks: int, k: int, device=None) -> torch.Tensor:
    """(Qb, Kb) bool: StreamingLLM-style blocks, the first block (attention sinks) plus a window, k blocks
    per query block in all (k = 1: the diagonal only)."""
    sel = select_window(n_blocks, max(k - 1, 1), device)
    if k > 1:
        sel[:, 0] = True
    return sel


def oracle_pooled(query: torch.Tensor, key: torch.Tensor, scaling: float, block: int) -> torch.Tensor:
    """(B, Hkv, Qb, Kb) the exact causal attention map max-pooled to tiles and max-ed over each GQA group,
    one query block at a time (memory O(block x N)). query (B, Hq, N, D), key (B, Hkv, N, D)."""
    b, hq, n, _ = query.shape
    hkv = key.shape[1]
    _check_block(block, n)
    k = key.float().repeat_interleave(hq // hkv, dim=1)
    out = query.new_zeros(b, hkv, n // block, n // block, dtype=torch.float32)
    pos = torch.arange(n, device=query.device)
    for qi in range(n // block):
        rows = slice(qi * block, (qi + 1) * block)
        s = (query[:, :, rows].float() @ k.transpose(-1, -2)) * scaling
        s = s.masked_fill(pos[None, :] > pos[rows, None], float("-inf"))
        p = s.softmax(-1).view(b, hq, block, n // block, block).amax((2, 4))  # (B, Hq, Kb)
        out[:, :, qi] = p.view(b, hkv, hq // hkv, -1).amax(2)
    return out


class BlockSelect(Modifier):
    """Block-sparse prefill: masks every tile outside a per-(layer, GQA group) block selection.

    Args:
        method: "seer_topk" / "seer_threshold" (needs ``gates``), "oracle_topk", "window", "sink_window"
            (the first block plus a window, as StreamingLLM keeps), or "dense"
            (keeps every causal block: a control that must reproduce the model's output).
        block: tokens per block; must divide the prefill length.
        k: blocks per query block for the top-k and window methods; ``threshold`` for seer_threshold.
        gates: a ModuleDict of :class:`attnlab.sparse.seer.AttnGate`, keyed by str(layer).

    After a prefill call, ``density[layer]`` is the fraction of causal blocks kept (mean over B and groups).
    Prefill only: decode calls with cached keys (Nq != Nk) run dense, so ``model.generate`` works under it.
    A prefill length that ``block`` does not divide gets a partial last block.
    """

    METHODS = ("seer_topk", "seer_threshold", "oracle_topk", "window", "sink_window", "dense")

    def __init__(self, method: str, block: int = 64, k: int | None = None, threshold: float | None = None,
                 gates=None):
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {self.METHODS}, got {method=}")
        _check_block(block)
        if method in ("seer_topk", "oracle_topk", "window", "sink_window"):
            _check_k(k)
        if method == "seer_threshold":
            select_threshold(torch.zeros(1, 1), threshold)  # validates
        if method.startswith("seer") and gates is None:
            raise ValueError(f"{method=} needs trained gates")
        self.method, self.block, self.k, self.threshold, self.gates = method, block, k, threshold, gates
        self.density: dict[int, float] = {}

    def selection(self, ctx: CallContext, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, Qb, Kb) bool for this prefill call; query (B, Hq, N, D), key (B, Hkv, N, D), N a multiple
        of ``block`` (:meth:`score_bias` pads a partial last block)."""
        n = query.shape[2]
        if n != key.shape[2]:
            raise ValueError(f"BlockSelect selects for prefill only (Nq == Nk); got {n=}, n_kv={key.shape[2]}")
        _check_block(self.block, n)
        b, hkv, qb = query.shape[0], key.shape[1], n // self.block
        if self.method == "dense":
            return causal_blocks(qb, query.device).expand(b, hkv, qb, qb)
        if self.method == "window":
            return select_window(qb, self.k, query.device).expand(b, hkv, qb, qb)
        if self.method == "sink_window":
            return select_sink_window(qb, self.k, query.device).expand(b, hkv, qb, qb)
        if self.method == "oracle_topk":
            return select_topk(oracle_pooled(query, key, ctx.scaling, self.block), self.k)
        gate = self.gates[str(ctx.layer)]
        pos = ctx.q_positions
        if pos.shape[0] < n:  # padded: positions continue past the last token
            pos = torch.cat([pos, pos[-1] + 1 + torch.arange(n - pos.shape[0], device=pos.device)])
        with torch.no_grad():
            log_gate = gate(*gate.features(query, key, self.block, pos))
        if self.method == "seer_topk":
            return select_topk(log_gate, self.k)
        return select_threshold(log_gate.exp(), self.threshold)

    def score_bias(self, ctx: CallContext) -> torch.Tensor | None:
        """(B, Hq, N, N) 0 / -1e9 for a prefill call; None (dense) for decode calls (Nq != Nk), as the paper
        sparsifies prefill only. A partial last block is padded with copies of the last query/key row."""
        if ctx.n_q != ctx.n_kv:
            return None
        query, key = ctx.extra["query"], ctx.extra["key"]
        n = query.shape[2]
        pad = -n % self.block
        if pad:  # padded keys lie after every real query, so causality keeps them out of real rows
            query = torch.cat([query, query[:, :, -1:].expand(-1, -1, pad, -1)], 2)
            key = torch.cat([key, key[:, :, -1:].expand(-1, -1, pad, -1)], 2)
        sel = self.selection(ctx, query, key)
        qb = sel.shape[-1]
        self.density[ctx.layer] = sel.sum().item() / (qb * (qb + 1) // 2 * sel.shape[0] * sel.shape[1])
        tokens = sel.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        tokens = tokens.repeat_interleave(self.block, dim=2).repeat_interleave(self.block, dim=3)[..., :n, :n]
        return torch.zeros(tokens.shape, dtype=torch.float32, device=query.device).masked_fill_(~tokens, NEG)

    def mean_density(self) -> float:
        return sum(self.density.values()) / max(len(self.density), 1)

    def attend(self, ctx: CallContext, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """(B, Hq, N, Dv) this call's block-sparse causal prefill run for speed, not simulated with a bias:
        attnlab's Triton block-sparse kernel skips the unselected tiles (CUDA; query (B, Hq, N, D), key/value
        (B, Hkv, N, D|Dv)). Equals SDPA under ``score_bias``'s mask (benchmarks/results/seer_h200_triton.md)."""
        from ..kernels.triton_block_sparse import block_sparse_attention

        return block_sparse_attention(query, key, value, self.selection(ctx, query, key), self.block, causal=True,
                                      scale=ctx.scaling)
