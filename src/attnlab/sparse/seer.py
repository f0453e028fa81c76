"""SeerAttention gates and block-sparse prefill for causal LMs run through ``attnlab.attach``.

Paper: "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs" (Gao et al., 2024).

* :class:`PooledAttention` (Observer): the block-pooled TRUE attention map (B, Hq, Qb, Kb) of every
  layer, max- or mean-pooled from the exact probability chunks, so no (N, N) map is ever kept.
* :class:`AttnGate`: per layer, Q avg-pooled and K max/min/avg-pooled over blocks, one small linear map
  each per KV head, block scores -> softmax over the causal key blocks: (B, Hkv, Qb, Kb).
* :func:`train_gates`: self-distillation, KL(pooled truth || gate), base model frozen.
* :class:`BlockSelect` (Modifier): block-sparse prefill; a selection (B, Hkv, Qb, Kb) per layer from
  the gates (top-k or threshold), the oracle pooled map (top-k) or a sliding window, always causal
  and always keeping the diagonal block, applied as a -1e9 logit bias outside the chosen tiles.

Ours, not the paper's: the gates read the post-RoPE queries/keys that attach exposes (the paper
re-applies RoPE to pooled pre-RoPE features); one selection per GQA group (the ground truth of a
group is the max over its query heads); the sparse prefill is simulated with a mask on CPU (it
measures quality, not speed; ``benchmarks/h200_seer.sh`` times the kernel).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..interventions.base import Modifier
from ..probes.base import CallContext, Observer

NEG = -1e9  # finite, so a row never becomes all -inf (the diagonal block is always kept anyway)


def _check_block(block: int, n: int | None = None, arg: str = "block") -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"{arg} must be a positive int, got {block=}")
    if n is not None and n % block:
        raise ValueError(f"{arg}={block} must divide the sequence length {n} (pad or cut the input)")


def causal_blocks(n_blocks: int, device=None) -> torch.Tensor:
    """(Qb, Kb) bool: key block j is in query block i's causal region iff j <= i (prefill, Nq == Nk)."""
    return torch.ones(n_blocks, n_blocks, dtype=torch.bool, device=device).tril()


class PooledAttention(Observer):
    """The block-pooled exact attention map of every layer, without an (Nq, Nk) map.

    ``maps[layer]``: (B, Hq, Qb, Kb) float32. ``reduce="max"``: the largest probability in the tile
    (the paper's 2-D max-pooling); ``"mean"``: the mean over the block's query rows of the probability
    mass each key block receives (each row sums to 1). Requires Nq and Nk divisible by ``block``.
    """

    def __init__(self, block: int = 64, reduce: str = "max"):
        _check_block(block)
        if reduce not in ("max", "mean"):
            raise ValueError(f"reduce must be 'max' or 'mean', got {reduce=}")
        self.block, self.reduce = block, reduce
        self.maps: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        self.maps = {}

    def observe(self, ctx: CallContext, q_start: int, probs: torch.Tensor) -> None:
        _check_block(self.block, ctx.n_q)
        _check_block(self.block, ctx.n_kv)
        b, h, c, nk = probs.shape
        kb = probs.view(b, h, c, nk // self.block, self.block)
        per_row = kb.amax(-1) if self.reduce == "max" else kb.sum(-1)  # (B, H, C, Kb)
        rows = (torch.arange(c, device=probs.device) + q_start) // self.block
        if ctx.layer not in self.maps:
            self.maps[ctx.layer] = probs.new_zeros(b, h, ctx.n_q // self.block, nk // self.block)
        acc = self.maps[ctx.layer]
        if self.reduce == "max":
            acc.scatter_reduce_(2, rows.view(1, 1, -1, 1).expand_as(per_row), per_row, "amax")
        else:
            acc.index_add_(2, rows, per_row / self.block)

    def result(self) -> dict:
        return {"layers": sorted(self.maps), "shape": list(next(iter(self.maps.values())).shape) if self.maps else []}


def target_distribution(pooled: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """(B, Hkv, Qb, Kb) the gate's training target: pooled map max-ed over each GQA group, rows summing to 1
    over the causal blocks. ``pooled``: (B, Hq, Qb, Kb) from :class:`PooledAttention`."""
    b, hq, qb, kb = pooled.shape
    grouped = pooled.view(b, n_kv_heads, hq // n_kv_heads, qb, kb).amax(2)
    grouped = grouped * causal_blocks(qb, pooled.device)
    return grouped / grouped.sum(-1, keepdim=True).clamp_min(1e-20)


def pool_qk(query: torch.Tensor, key: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block features: q (B, Hkv, Qb, D) the mean over blocks and over each GQA group's query heads;
    k (B, Hkv, Kb, 3D) the [max, min, mean] over blocks. query (B, Hq, N, D), key (B, Hkv, N, D)."""
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    _check_block(block, n)
    _check_block(block, key.shape[2])
    q = query.float().view(b, hkv, hq // hkv, n // block, block, d).mean((2, 4))
    kb = key.float().view(b, hkv, key.shape[2] // block, block, d)
    return q, torch.cat([kb.amax(3), kb.amin(3), kb.mean(3)], -1)


class AttnGate(torch.nn.Module):
    """One layer's gate: block scores (B, Hkv, Qb, Kb) from pooled q/k features, per KV head.

    Args:
        n_kv_heads, head_dim: of the model's layer; ``hidden``: the gate's projection width.
    """

    def __init__(self, n_kv_heads: int, head_dim: int, hidden: int = 64):
        super().__init__()
        self.wq = torch.nn.Parameter(torch.randn(n_kv_heads, head_dim, hidden) / math.sqrt(head_dim))
        self.wk = torch.nn.Parameter(torch.randn(n_kv_heads, 3 * head_dim, hidden) / math.sqrt(3 * head_dim))
        self.hidden = hidden

    def forward(self, q_feat: torch.Tensor, k_feat: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (B, Hkv, Qb, Kb) over causal key blocks (-inf outside the causal region)."""
        q = torch.einsum("bhqd,hde->bhqe", q_feat, self.wq)
        k = torch.einsum("bhkd,hde->bhke", k_feat, self.wk)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.hidden)
        scores = scores.masked_fill(~causal_blocks(scores.shape[-2], scores.device), float("-inf"))
        return scores.log_softmax(-1)


def gate_kl(log_gate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || gate) summed over key blocks, averaged over (B, Hkv, Qb). Both (B, Hkv, Qb, Kb)."""
    causal = causal_blocks(target.shape[-2], target.device)
    t = target.clamp_min(1e-12)
    kl = torch.where(causal & (target > 0), target * (t.log() - log_gate), torch.zeros_like(target))
    return kl.sum(-1).mean()


class _Capture(Modifier):
    """Keeps each layer's pooled q/k features (score_bias is the hook that sees the rotated q/k)."""

    def __init__(self, block: int):
        self.block, self.feats = block, {}

    def score_bias(self, ctx: CallContext):
        self.feats[ctx.layer] = pool_qk(ctx.extra["query"].detach(), ctx.extra["key"].detach(), self.block)
        return None


@torch.no_grad()
def calibration_data(model, input_ids: torch.Tensor, block: int = 64, chunk: int = 256) -> dict[int, tuple]:
    """{layer: (q_feat, k_feat, target)} for one batch ``input_ids`` (B, N), N divisible by ``block``."""
    from ..hf.attach import attach

    _check_block(block, input_ids.shape[-1])
    pooled, cap = PooledAttention(block), _Capture(block)
    with attach(model, [pooled], [cap], chunk=chunk):
        model(input_ids=input_ids)
    hkv = model.config.num_key_value_heads
    return {i: (*cap.feats[i], target_distribution(pooled.maps[i], hkv)) for i in pooled.maps}


def make_gates(model, hidden: int = 64, seed: int = 0) -> torch.nn.ModuleDict:
    """One :class:`AttnGate` per layer of ``model`` (a Llama-like config), keyed by str(layer)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    torch.manual_seed(seed)
    return torch.nn.ModuleDict(
        {str(i): AttnGate(cfg.num_key_value_heads, head_dim, hidden) for i in range(cfg.num_hidden_layers)}
    )


def mean_kl(gates: torch.nn.ModuleDict, data: list[dict]) -> float:
    """Mean over layers and batches of :func:`gate_kl`."""
    with torch.no_grad():
        vals = [gate_kl(gates[str(i)](q, k), t).item() for d in data for i, (q, k, t) in d.items()]
    return sum(vals) / len(vals)


def train_gates(gates: torch.nn.ModuleDict, data: list[dict], steps: int = 200, lr: float = 3e-3) -> list[float]:
    """Self-distillation: Adam on the summed per-layer KL, one calibration batch per step (cycled).

    ``data``: outputs of :func:`calibration_data` (the base model is not touched: only features are used).
    Returns the loss (mean per-layer KL) of each step.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps=}")
    opt = torch.optim.Adam(gates.parameters(), lr=lr)
    losses = []
    for s in range(steps):
        batch = data[s % len(data)]
        loss = sum(gate_kl(gates[str(i)](q, k), t) for i, (q, k, t) in batch.items()) / len(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
