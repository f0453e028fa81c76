"""Block-sparse prefill through ``attnlab.attach``: SeerAttention gates vs oracle top-k vs sliding window.

Paper: "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs" (Gao et al., 2024); the
comparison at equal density follows "The Sparse Frontier: Sparse Attention Trade-offs in Transformer LLMs".

Every selection is (B, Hkv, Qb, Kb) bool: one per GQA group, inside the causal block region, with the
diagonal block always kept (so every query row keeps at least itself). On CPU the selection runs as a
-1e9 logit bias outside the chosen tiles (quality only; the fused block-sparse kernel is timed on GPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..interventions.base import Modifier
from ..probes.base import CallContext
from .seer import NEG, _check_block, causal_blocks, deviation_weights, out_proj_factor
from .seer_adaptive import _check_p, free_distribution, select_budget, select_head_topk, select_topp, topp_priority


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top-k must be a positive int (blocks per query block), got {k=}")


def select_topk(scores: torch.Tensor, k: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, Qb, Kb) bool: the diagonal block plus the k - 1 best-scored causal blocks of each row.

    ``forced`` (Qb, Kb) bool: blocks kept whatever their score (e.g. :func:`forced_blocks`), counted in k."""
    _check_k(k)
    qb, kb = scores.shape[-2:]
    causal = causal_blocks(qb, scores.device)
    s = scores.float().masked_fill(~causal, float("-inf"))
    keep = torch.eye(qb, kb, dtype=torch.bool, device=scores.device)
    if forced is not None:
        keep = keep | forced.to(scores.device)
    s = s.masked_fill(keep, float("inf"))
    idx = s.topk(min(k, kb), dim=-1).indices
    sel = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
    return sel & causal  # rows with fewer than k causal blocks picked some -inf ones: drop them


def forced_blocks(n_blocks: int, keep_sink: bool = False, keep_local: int = 1, device=None) -> torch.Tensor:
    """(Qb, Kb) bool: the blocks a selection always keeps: the ``keep_local`` most recent blocks (the diagonal
    and the keep_local - 1 before it) and, with ``keep_sink``, the first block (attention sinks).

    SeerAttention's own code keeps only what its gate picks (optionally the last query blocks dense); forcing
    the sink and local blocks is ours, after StreamingLLM, so the gate spends its k on the far blocks only."""
    if isinstance(keep_local, bool) or not isinstance(keep_local, int) or keep_local < 1:
        raise ValueError(f"keep_local must be an int >= 1 (the diagonal block is always kept), got {keep_local=}")
    sel = select_window(n_blocks, keep_local, device)
    if keep_sink:
        sel[:, 0] = True
    return sel


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


ORACLE_REDUCES = ("max", "mass", "dev", "devo")


def oracle_pooled(query: torch.Tensor, key: torch.Tensor, scaling: float, block: int, reduce: str = "max",
                  rows: int = 1024, value: torch.Tensor | None = None,
                  out_r: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Hkv, Qb, Kb) the exact causal attention map pooled to tiles, per GQA group, ``rows`` query rows
    at a time (memory O(rows x N)). query (B, Hq, N, D), key (B, Hkv, N, D).

    ``reduce="max"``: the tile's largest probability, max-ed over the group's heads (the paper's 2-D max
    pooling, the gates' target); ``"mass"``: the probability mass the tile holds, summed over the group's
    heads and the block's query rows (ranks blocks by the attention a top-k selection would keep);
    ``"dev"`` / ``"devo"`` (ours): as "mass" with each probability weighted by ||v_k - o_q|| (needs ``value``
    (B, Hkv, N, Dv); "devo" also ``out_r`` (Hq, Dv, Dv), ``seer.out_proj_factor``): ranks blocks by how far
    dropping them moves the attention output (``seer.deviation_weights``)."""
    if reduce not in ORACLE_REDUCES:
        raise ValueError(f"reduce must be one of {ORACLE_REDUCES}, got {reduce=}")
    if reduce.startswith("dev") and value is None:
        raise ValueError(f"{reduce=} needs the values (value=None)")
    if reduce == "devo" and out_r is None:
        raise ValueError("reduce='devo' needs out_r (seer.out_proj_factor of the layer's attention module)")
    b, hq, n, _ = query.shape
    hkv, g = key.shape[1], hq // key.shape[1]
    _check_block(block, n)
    rows = max(block, rows // block * block)
    k = key.float().repeat_interleave(g, dim=1)
    out = query.new_zeros(b, hkv, n // block, n // block, dtype=torch.float32)
    pos = torch.arange(n, device=query.device)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        s = (query[:, :, r0:r1].float() @ k.transpose(-1, -2)) * scaling
        s = s.masked_fill(pos[None, :] > pos[r0:r1, None], float("-inf"))
        p = s.softmax(-1)
        if reduce.startswith("dev"):
            p = deviation_weights(p, value, out_r if reduce == "devo" else None)
        p = p.view(b, hkv, g, (r1 - r0) // block, block, n // block, block)
        out[:, :, r0 // block:r1 // block] = p.amax((2, 4, 6)) if reduce == "max" else p.sum((2, 4, 6))
    return out


def tile_density(sel: torch.Tensor, block: int, tile: int = 64) -> float:
    """Fraction of the causal ``tile`` x ``tile`` kernel tiles that a block selection (B, H, Qb, Kb) touches.

    With blocks finer than the kernel's tiles (attnlab's Triton kernel runs 64 x 64 tiles for blocks that are
    not multiples of 64) a tile is computed when any of its cells is selected, so this, not the block density,
    bounds the kernel's speed-up. ``tile`` must be a multiple of ``block``; for block >= tile it is the block
    density's counterpart at tile granularity (the selection itself when block == tile)."""
    _check_block(block)
    if tile % block and block % tile:
        raise ValueError(f"tile={tile} and block={block} must divide one another")
    b, h, qb, _ = sel.shape
    if block >= tile:
        cells = sel
    else:
        r = tile // block
        qt = -(-qb // r)
        pad = qt * r - qb
        cells = F.pad(sel, (0, pad, 0, pad)).view(b, h, qt, r, qt, r).any(5).any(3)
    n = cells.shape[-1]
    return cells.sum().item() / (n * (n + 1) // 2 * b * h)


class BlockSelect(Modifier):
    """Block-sparse prefill: masks every tile outside a per-(layer, GQA group) block selection.

    Args:
        method: "seer_topk" / "seer_threshold" (needs ``gates``), "oracle_topk", "window", "sink_window"
            (the first block plus a window, as StreamingLLM keeps), or "dense"
            (keeps every causal block: a control that must reproduce the model's output).
            Adaptive allocations (ours, :mod:`attnlab.sparse.seer_adaptive`), from the gate's distribution
            ("seer_*") or the oracle's pooled map ("oracle_*"), renormalised over the free blocks:
            "seer_topp" / "oracle_topp": top-p per row, with ``p`` (fixed mass, density follows) or with ``k``
            (one p per layer such that the layer keeps exactly top-k's block count, hence top-k's density);
            "seer_global" / "oracle_global": top-k's block count per layer given to the layer's largest
            probabilities over all heads and rows (needs ``k``). ``renorm=False`` (oracle only): rank by
            each block's true share of its row's attention, the forced blocks' share included.
            "seer_headk" / "oracle_headk": uniform top-k per row with one k per (layer, KV head), ``head_k``
            ({layer: [k per KV head]}, e.g. ``seer_adaptive.allocate_head_k`` on calibration maps).
        block: tokens per block; must divide the prefill length.
        k: blocks per query block for the top-k and window methods (the adaptive ones: the uniform top-k whose
            block count they spend); ``threshold`` for seer_threshold; ``p`` for the top-p methods without k.
        gates: a ModuleDict of :class:`attnlab.sparse.seer.AttnGate`, keyed by str(layer).
        keep_sink, keep_local: for the seer and oracle methods, blocks kept whatever their score
            (:func:`forced_blocks`: the first block, the ``keep_local`` most recent); top-k counts them in k.
        oracle_reduce: "max" (the paper's max-pooled map) or "mass" (tile probability mass) for the oracle methods;
            "dev" / "devo" (ours): tile mass weighted by each key's distance to the query's output (through
            o_proj for "devo"; :func:`oracle_pooled`), needs the call's values (``ctx.extra["value"]``).

    After a prefill call, ``density[layer]`` is the fraction of causal blocks kept (mean over B and groups) and
    ``tiles[layer]`` the fraction of causal 64 x 64 kernel tiles they touch (:func:`tile_density`).
    Prefill only: decode calls with cached keys (Nq != Nk) run dense, so ``model.generate`` works under it.
    A prefill length that ``block`` does not divide gets a partial last block.
    """

    METHODS = ("seer_topk", "seer_threshold", "oracle_topk", "window", "sink_window", "dense",
               "seer_topp", "oracle_topp", "seer_global", "oracle_global", "seer_headk", "oracle_headk")
    BUDGETED = ("seer_topk", "oracle_topk", "seer_global", "oracle_global")  # k required, forced blocks count in it

    def __init__(self, method: str, block: int = 64, k: int | None = None, threshold: float | None = None,
                 gates=None, keep_sink: bool = False, keep_local: int = 1, oracle_reduce: str = "max",
                 p: float | None = None, renorm: bool = True, head_k: dict | None = None):
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {self.METHODS}, got {method=}")
        _check_block(block)
        if method in ("seer_topk", "oracle_topk", "window", "sink_window", "seer_global", "oracle_global"):
            _check_k(k)
        if method.endswith("_topp"):
            if (k is None) == (p is None):
                raise ValueError(f"{method=} takes exactly one of k (top-k's budget) and p (fixed mass), got {k=}, {p=}")
            if p is None:
                _check_k(k)
            else:
                _check_p(p)
        elif p is not None:
            raise ValueError(f"p is for the top-p methods only, got {p=} with {method=}")
        if method.endswith("_headk"):
            if not isinstance(head_k, dict) or not head_k:
                raise ValueError(f"{method=} needs head_k, a dict {{layer: [k per KV head]}}, got {head_k=}")
            for layer, ks in head_k.items():
                if any(isinstance(x, bool) or not isinstance(x, int) or x < keep_local + bool(keep_sink) for x in ks):
                    raise ValueError(f"head_k[{layer}]={ks} must hold ints >= the forced blocks per row "
                                     f"({keep_local=} + {keep_sink=})")
        elif head_k is not None:
            raise ValueError(f"head_k is for seer_headk / oracle_headk only, got {method=}")
        if method == "seer_threshold":
            select_threshold(torch.zeros(1, 1), threshold)  # validates
        if method.startswith("seer") and gates is None:
            raise ValueError(f"{method=} needs trained gates")
        forced_blocks(1, keep_sink, keep_local)  # validates keep_local
        if k is not None and (method in self.BUDGETED or method.endswith("_topp")) and k < keep_local + bool(keep_sink):
            raise ValueError(f"top-k k={k} must be >= the forced blocks per row ({keep_local=} + {keep_sink=})")
        if oracle_reduce not in ORACLE_REDUCES:
            raise ValueError(f"oracle_reduce must be one of {ORACLE_REDUCES}, got {oracle_reduce=}")
        self.method, self.block, self.k, self.threshold, self.gates = method, block, k, threshold, gates
        if not isinstance(renorm, bool):
            raise ValueError(f"renorm must be a bool, got {renorm=}")
        if not renorm and method not in ("oracle_topp", "oracle_global"):
            raise ValueError(f"renorm=False (true attention shares) is for oracle_topp / oracle_global only, got {method=}")
        self.keep_sink, self.keep_local, self.oracle_reduce, self.p = bool(keep_sink), keep_local, oracle_reduce, p
        self.renorm, self.head_k = renorm, head_k
        self.density: dict[int, float] = {}
        self.tiles: dict[int, float] = {}

    def selection(self, ctx: CallContext, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Hkv, Qb, Kb) bool for this prefill call; query (B, Hq, N, D), key (B, Hkv, N, D), N a multiple
        of ``block`` (:meth:`score_bias` pads a partial last block); value (B, Hkv, N, Dv) for the "dev" oracles."""
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
        forced = forced_blocks(qb, self.keep_sink, self.keep_local, query.device)
        if self.method.startswith("oracle"):
            out_r = None
            if self.oracle_reduce == "devo":
                out_r = out_proj_factor(ctx.module, query.shape[1]).to(query.device)
            pooled = oracle_pooled(query, key, ctx.scaling, self.block, self.oracle_reduce, value=value, out_r=out_r)
            if self.method == "oracle_topk":
                return select_topk(pooled, self.k, forced)
            if self.method == "oracle_headk":
                return select_head_topk(pooled, self._layer_k(ctx.layer), forced)
            return self._adaptive(pooled, forced)
        gate = self.gates[str(ctx.layer)]
        pos = ctx.q_positions
        if pos.shape[0] < n:  # padded: positions continue past the last token
            pos = torch.cat([pos, pos[-1] + 1 + torch.arange(n - pos.shape[0], device=pos.device)])
        with torch.no_grad():
            log_gate = gate(*gate.features(query, key, self.block, pos))
        if self.method == "seer_topk":
            return select_topk(log_gate, self.k, forced)
        if self.method == "seer_headk":
            return select_head_topk(log_gate, self._layer_k(ctx.layer), forced)
        if self.method != "seer_threshold":
            return self._adaptive(log_gate.exp(), forced)
        return select_threshold(log_gate.exp(), self.threshold) | (forced & causal_blocks(qb, query.device))

    def _needs_value(self) -> bool:
        return self.method.startswith("oracle") and self.oracle_reduce.startswith("dev")

    def _layer_k(self, layer: int) -> list[int]:
        if layer not in self.head_k:
            raise ValueError(f"head_k has no entry for {layer=} (layers: {sorted(self.head_k)})")
        return list(self.head_k[layer])

    def _adaptive(self, probs: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
        """The *_topp / *_global selections from block probabilities (B, Hkv, Qb, Kb) >= 0."""
        if self.method.endswith("_topp") and self.p is not None:
            return select_topp(probs, self.p, forced, self.renorm)
        prio = (topp_priority(probs, forced, self.renorm) if self.method.endswith("_topp")
                else free_distribution(probs, forced, self.renorm))
        return select_budget(prio, self.k, forced)

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
        more = ()
        if self._needs_value():  # (only then: wrappers of the 3-argument selection keep working)
            value = ctx.extra.get("value")
            if value is None:
                raise ValueError(f"oracle_reduce={self.oracle_reduce!r} needs ctx.extra['value'] (attnlab.attach)")
            if pad:
                value = torch.cat([value, value[:, :, -1:].expand(-1, -1, pad, -1)], 2)
            more = (value,)
        sel = self.selection(ctx, query, key, *more)
        qb = sel.shape[-1]
        self.density[ctx.layer] = sel.sum().item() / (qb * (qb + 1) // 2 * sel.shape[0] * sel.shape[1])
        if 64 % self.block == 0 or self.block % 64 == 0:
            self.tiles[ctx.layer] = tile_density(sel, self.block, 64)
        tokens = sel.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        tokens = tokens.repeat_interleave(self.block, dim=2).repeat_interleave(self.block, dim=3)[..., :n, :n]
        return torch.zeros(tokens.shape, dtype=torch.float32, device=query.device).masked_fill_(~tokens, NEG)

    def mean_density(self) -> float:
        return sum(self.density.values()) / max(len(self.density), 1)

    def mean_tile_density(self) -> float | None:
        """Mean over layers of ``tiles`` (None when the block and 64 do not divide one another)."""
        return sum(self.tiles.values()) / len(self.tiles) if self.tiles else None

    def attend(self, ctx: CallContext, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """(B, Hq, N, Dv) this call's block-sparse causal prefill run for speed, not simulated with a bias:
        attnlab's Triton block-sparse kernel skips the unselected tiles (CUDA; query (B, Hq, N, D), key/value
        (B, Hkv, N, D|Dv)). Equals SDPA under ``score_bias``'s mask (benchmarks/results/seer_h200_triton.md)."""
        from ..kernels.triton_block_sparse import block_sparse_attention

        sel = self.selection(ctx, query, key, *((value,) if self._needs_value() else ()))
        return block_sparse_attention(query, key, value, sel, self.block, causal=True, scale=ctx.scaling)
