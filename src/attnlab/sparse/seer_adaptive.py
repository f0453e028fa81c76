"""Adaptive block budgets for block-sparse prefill: spend top-k's blocks where the rows need them.

Paper: "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs" (Gao et al., 2024) selects blocks
from its gate's per-row distribution with a uniform top-k or a fixed threshold. The allocations here are
ours: they keep EXACTLY as many blocks per layer as uniform top-k with the same k (so the density is the
same by construction, not by tuning), but let rows and heads of one layer differ in how many they get.

* :func:`select_topp`: top-p per row with a fixed p (the smallest set of free blocks whose mass reaches p);
  its density is whatever p gives.
* :func:`select_budget` with :func:`topp_priority`: top-p at top-k's budget: one p per layer (and sequence)
  chosen so that the layer keeps exactly top-k's block count. A block's priority is minus the mass of the
  blocks ranked above it in its row; keeping the ``budget`` highest priorities is top-p at the largest p that
  fits the budget (diffuse rows get many blocks, peaked rows few).
* :func:`select_budget` with the probabilities themselves as priority: the budget goes to the largest
  probabilities of the layer, whatever their row (maximises the kept mass summed over rows; peaked rows win).

Probabilities are renormalised over each row's FREE blocks (causal, not forced): the gates are trained on
exactly that distribution (``seer.gate_kl`` with ``exclude``), so the oracle's rows use the same one.
* :func:`allocate_head_k` with :func:`kept_mass_curve` and :func:`select_head_topk`: one uniform k per (layer,
  KV head), allocated offline from calibration maps (greedy on the attention share kept per block), spending at
  most top-k's block count over the whole model (``BlockSelect("seer_headk" | "oracle_headk", head_k=...)``).

All selections are (B, H, Qb, Kb) bool, inside the causal block region, with the forced blocks (at least
the diagonal) always in and counted in the budget. Rows keeping different numbers of blocks need nothing new
from the kernel: attnlab's Triton block-sparse kernel walks a per-(head, query tile) list of key tiles with its
own count (``tests/sparse/test_seer_adaptive.py::test_variable_blocks_per_row_on_the_kernel``).

Measured (oracle, SmolLM2-135M, 2K tokens, 16-token blocks, density 0.106, CPU; benchmarks/results/
seer_alloc_cpu.md): uniform top-k +10.6% perplexity, per-head k +10.1%, global per layer +10.4% on true
attention shares but +12.4% on the free-block shares the gates know, top-p at the same budget +11.5% / +13.5%
(renormalised / true), top-p with a fixed p worse still. Equalising kept mass per row does not pay; moving
budget between heads and layers does, a little. At 8K on the H200 (benchmarks/results/seer16p_h200.md, density
0.099, gates trained on 254K tokens): per-head k gives the gates +5.8% (uniform top-k +6.4%, top-p at the
budget +6.3%, global +7.0%) and the oracle +3.0% (uniform +3.5% to +3.9%). Curves ranked by the gates instead
of the map (+5.9%) or layers weighted by their single-layer loss rise (+9.8%) did not help (seer16p_h200_r2.md).
Curves of the output-deviation map (``seer`` target "dev", ours) move blocks from layers 3-10 to 20-29: at 2K (CPU)
the oracle then gets +8.3% instead of +11.9%, at 8K (H200) +2.79% instead of +2.97% (seer7_cpu2k.md,
seer7_h200.md); weighting rows by their absolute deviation (``row_weight``) was worse at 2K (+11.8% / +13.7%).
"""
from __future__ import annotations

import heapq

import torch

from .seer import causal_blocks


def _check_p(p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
        raise ValueError(f"top-p mass p must be a float in (0, 1), got {p=}")


def _kept(qb: int, forced: torch.Tensor | None, device) -> torch.Tensor:
    """(Qb, Kb) bool: the blocks every selection keeps: ``forced`` (causal part) plus the diagonal."""
    keep = torch.eye(qb, dtype=torch.bool, device=device)
    if forced is not None:
        keep = keep | (forced.to(device) & causal_blocks(qb, device))
    return keep


def free_distribution(probs: torch.Tensor, forced: torch.Tensor | None = None, renorm: bool = True) -> torch.Tensor:
    """(B, H, Qb, Kb) float32: ``probs`` (B, H, Qb, Kb) >= 0 kept on the free blocks (causal, not forced, not
    the diagonal) and renormalised to sum 1 per row over them; rows without free blocks (or mass) are all 0.

    ``renorm=False``: normalised over ALL causal blocks instead (each free block's true share of the row's
    attention; a row whose forced blocks hold most of it has little free mass). Only the oracle knows that
    share: gates trained with the forced blocks left out of the KL only know the free distribution."""
    qb = probs.shape[-2]
    causal = causal_blocks(qb, probs.device)
    free = causal & ~_kept(qb, forced, probs.device)
    p = probs.float().clamp_min(0) * causal
    total = (p if not renorm else p * free).sum(-1, keepdim=True).clamp_min(1e-30)
    return p * free / total


def mass_before(dist: torch.Tensor) -> torch.Tensor:
    """(B, H, Qb, Kb): for each block, the mass of the blocks ranked above it in its row (descending by
    ``dist``, ties by index). Top-p keeps exactly the blocks with mass_before < p."""
    val, idx = dist.sort(dim=-1, descending=True, stable=True)
    before = val.cumsum(-1) - val
    return torch.empty_like(before).scatter_(-1, idx, before)


def select_topp(probs: torch.Tensor, p: float, forced: torch.Tensor | None = None, renorm: bool = True) -> torch.Tensor:
    """(B, H, Qb, Kb) bool: the forced blocks and the diagonal, plus per row the smallest set of free blocks
    whose renormalised mass (:func:`free_distribution`) reaches ``p``. probs (B, H, Qb, Kb) >= 0.
    ``renorm=False``: the smallest set whose true share, the forced blocks' share included, reaches ``p``."""
    _check_p(p)
    qb = probs.shape[-2]
    free_sel = -topp_priority(probs, forced, renorm) < p  # blocks without mass have priority -2: never
    return (free_sel | _kept(qb, forced, probs.device)) & causal_blocks(qb, probs.device)


def topk_count(n_blocks: int, k: int) -> int:
    """Blocks per (sequence, head) that uniform top-k keeps: sum over rows of min(row's causal blocks, k)."""
    return sum(min(i, k) for i in range(1, n_blocks + 1))


def topp_priority(probs: torch.Tensor, forced: torch.Tensor | None = None, renorm: bool = True) -> torch.Tensor:
    """(B, H, Qb, Kb) priority for :func:`select_budget` that makes it top-p at one p per layer: minus
    :func:`mass_before` of the free distribution (blocks with no mass last). ``renorm=False``: the mass
    ranked above a block also counts the row's forced blocks (true top-p: rows whose forced blocks already
    hold most of the attention come last)."""
    dist = free_distribution(probs, forced, renorm)
    before = mass_before(dist)
    if not renorm:  # the forced blocks rank first: their share counts in every free block's mass_before
        before = before + (1 - dist.sum(-1, keepdim=True))
    return torch.where(dist > 0, -before, torch.full_like(dist, -2.0))


def select_budget(priority: torch.Tensor, k: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, Qb, Kb) bool: per sequence, the forced blocks and the diagonal plus the highest-``priority``
    free blocks over ALL heads and rows, H * :func:`topk_count` (Qb, k) blocks in all: exactly uniform
    top-k's count (its density), distributed by priority. priority (B, H, Qb, Kb), comparable across rows.

    ``k`` must be at least the blocks forced per row (then the forced blocks always fit in the budget)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int (top-k's blocks per query block), got {k=}")
    b, h, qb, kb = priority.shape
    kept = _kept(qb, forced, priority.device)
    if k < int(kept.sum(-1).max()):
        raise ValueError(f"k={k} is below the {int(kept.sum(-1).max())} blocks forced per row")
    causal = causal_blocks(qb, priority.device)
    s = priority.float().masked_fill(~causal, float("-inf")).masked_fill(kept, float("inf"))
    budget = h * topk_count(qb, k)  # <= h * causal count, so no -inf block is ever needed
    idx = s.reshape(b, h * qb * kb).topk(budget, dim=-1).indices
    sel = torch.zeros(b, h * qb * kb, dtype=torch.bool, device=priority.device).scatter_(-1, idx, True)
    return sel.view(b, h, qb, kb) & causal


def kept_mass_curve(target: torch.Tensor, forced: torch.Tensor | None = None, k_max: int | None = None,
                    scores: torch.Tensor | None = None, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """(H, k_max + 1): per head, the attention share that uniform top-k keeps, mean over batch and rows, for
    k = 0..k_max (k counts the forced blocks and the diagonal; entry 0 is 0). ``target`` (B, H, Qb, Kb): rows
    summing to 1 over the causal blocks (e.g. ``seer.calibration_targets``' "mass" map), ranked by themselves
    (the oracle's choice) or, with ``scores`` (B, H, Qb, Kb), by those (e.g. a gate's log-probabilities: the
    share the GATE's top-k keeps, so that a budget goes where the gate needs it). A row with fewer than k
    blocks keeps all of them. ``row_weight`` (B, H, Qb) >= 0 (ours): each row's share weighted by it (e.g. the
    row's absolute output deviation, ``seer.calibration_targets(totals=True)``), so that heads compare in
    absolute units, not in shares of their own rows."""
    b, h, qb, kb = target.shape
    k_max = qb if k_max is None else min(k_max, qb)
    kept = _kept(qb, forced, target.device)
    dist = free_distribution(target, forced, renorm=False)  # true shares of the free blocks
    base = 1 - dist.sum(-1)  # (B, H, Qb) the forced blocks' share
    free = causal_blocks(qb, target.device) & ~kept
    if scores is None:
        ranked = dist.sort(-1, descending=True).values
    else:  # the free blocks in the scores' order (the others, -inf, last: no row counts past its free blocks)
        order = scores.float().masked_fill(~free, float("-inf")).argsort(dim=-1, descending=True, stable=True)
        ranked = dist.gather(-1, order)
    cum = torch.cat([torch.zeros_like(dist[..., :1]), ranked.cumsum(-1)], -1)
    n_kept = kept.sum(-1)  # (Qb,)
    n_free = free.sum(-1)
    ks = torch.arange(1, k_max + 1, device=target.device)
    # free blocks a row keeps at each k: rows whose forced blocks alone exceed k keep those anyway
    extra = (ks[None, :] - n_kept[:, None]).clamp(min=0).minimum(n_free[:, None])  # (Qb, K)
    mass = base[..., None] + cum.gather(-1, extra.expand(b, h, qb, k_max))  # (B, H, Qb, K)
    if row_weight is not None:
        mass = mass * row_weight.to(mass)[..., None]
    curve = torch.zeros(h, k_max + 1, device=target.device)
    curve[:, 1:] = mass.mean((0, 2))
    return curve


def allocate_head_k(curves: dict[int, torch.Tensor], n_blocks: int, k: int, k_min: int = 1) -> dict[int, list[int]]:
    """{layer: [k per head]}: per-head uniform budgets whose block count, summed over all layers and heads, is at
    most that of one k everywhere (:func:`topk_count`), chosen greedily by kept attention share per block
    (``curves`` from :func:`kept_mass_curve` on calibration data: concave, so greedy is optimal up to the
    last step). Every head starts at ``k_min`` (at least the forced blocks per row)."""
    if isinstance(k, bool) or not isinstance(k, int) or not k_min <= k <= n_blocks:
        raise ValueError(f"k must be an int in [{k_min=}, {n_blocks=}], got {k=}")
    curves = {layer: c.detach().double().cpu().tolist() for layer, c in curves.items()}  # no device syncs below
    alloc = {layer: [k_min] * len(c) for layer, c in curves.items()}
    budget = sum(len(a) for a in alloc.values()) * (topk_count(n_blocks, k) - topk_count(n_blocks, k_min))

    def step(layer: int, h: int):
        """(-(kept share gained per block), layer, head) of this head's next k, None past its curve."""
        kk, c = alloc[layer][h], curves[layer][h]
        if kk >= min(n_blocks, len(c) - 1):
            return None
        return (-(c[kk + 1] - c[kk]) / (n_blocks - kk), layer, h)

    heap = [st for layer in alloc for h in range(len(alloc[layer])) if (st := step(layer, h)) is not None]
    heapq.heapify(heap)
    while heap:
        _, layer, h = heapq.heappop(heap)
        cost = n_blocks - alloc[layer][h]  # the rows with more causal blocks than the head's k
        if cost > budget:
            continue  # a head further along (cheaper steps) may still fit
        budget -= cost
        alloc[layer][h] += 1
        if (st := step(layer, h)) is not None:
            heapq.heappush(heap, st)
    return alloc


def select_head_topk(scores: torch.Tensor, head_k, forced: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, Qb, Kb) bool: per head h, uniform top-``head_k[h]`` of each row (the forced blocks and the diagonal
    first, counted in it), as ``seer_prefill.select_topk`` with one k per head. scores (B, H, Qb, Kb)."""
    b, h, qb, kb = scores.shape
    if len(head_k) != h or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in head_k):
        raise ValueError(f"head_k must hold one positive int per head ({h}), got {head_k=}")
    kept = _kept(qb, forced, scores.device)
    if min(head_k) < int(kept.sum(-1).max()):
        raise ValueError(f"head_k={list(head_k)} has a k below the {int(kept.sum(-1).max())} blocks forced per row")
    causal = causal_blocks(qb, scores.device)
    s = scores.float().masked_fill(~causal, float("-inf")).masked_fill(kept, float("inf"))
    order = s.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(kb, device=scores.device).expand_as(order))
    ks = torch.tensor(list(head_k), device=scores.device).view(1, h, 1, 1)
    return (rank < ks) & causal
