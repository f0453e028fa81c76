"""Per-head entropy, mean attention distance and locality profile.

Paper: "How Does Attention Work in Vision Transformers? A Visual Analytics Attempt" (Li et al.,
IEEE TVCG / PacificVis 2023, arXiv 2303.13731), which profiles each head's attention strength
against the distance between query and key. For a real query row i of head (l, h), over the keys
it can see:

- entropy H_i = -sum_j p_ij log p_ij (nats); normalised entropy H_i / log(n_i) with n_i the number
  of visible keys (rows with n_i = 1 are left out of the normalised mean: 0/0);
- distance d_i = sum_j p_ij |pos_i - j|;
- locality: mass sum_j p_ij [|pos_i - j| in bucket b], buckets 0, 1, 2-3, 4-7, ... (log2).

Each is averaged over all real query rows (all samples). State: O(L * H * n_buckets).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..probes.base import CallContext, Observer
from ..probes.prefix import mass_before, row_cumsum
from ..probes.visibility import chunk_positions, key_limit, query_valid, visible_per_query

MAX_BUCKETS = 33  # distances up to 2**31 - 1


def bucket_labels(n: int) -> list[str]:
    """Names of the first ``n`` distance buckets: '0', '1', '2-3', '4-7', ..."""
    return ["0"] + [str(1 << (b - 1)) if b == 1 else f"{1 << (b - 1)}-{(1 << b) - 1}" for b in range(1, n)]


def bucket_of(distance: torch.Tensor) -> torch.Tensor:
    """Bucket index of integer distances: 0 -> 0, d >= 1 -> floor(log2 d) + 1."""
    d = distance.long()
    out = torch.zeros_like(d)
    pos = d > 0
    out[pos] = torch.floor(torch.log2(d[pos].double())).long() + 1
    return out


def _bucket_mass(probs: torch.Tensor, pos: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """(B, H, C, n_buckets) attention mass per distance bucket, from row prefix sums.

    Bucket b covers distances [lo, hi]; its mass is the keys [pos - hi, pos - lo] plus, for b > 0,
    [pos + lo, pos + hi], each read as a difference of the prefix sum (one shared pass over the chunk).
    """
    n_kv = probs.shape[-1]
    cs = row_cumsum(probs)
    lo = torch.tensor([0] + [1 << (b - 1) for b in range(1, n_buckets)])
    hi = torch.tensor([0] + [(1 << b) - 1 for b in range(1, n_buckets)])
    p = pos[:, None]
    # mass of keys [a, z] = before(z + 1) - before(a); left side [p - hi, p - lo], right [p + lo, p + hi]
    edges = torch.cat([(p - lo + 1), (p - hi), (p + hi + 1), (p + lo)], dim=1).clamp(0, n_kv)  # (C, 4 nb)
    g = mass_before(cs, edges)
    nb = n_buckets
    left = g[..., :nb] - g[..., nb : 2 * nb]
    right = g[..., 2 * nb : 3 * nb] - g[..., 3 * nb :]
    right[..., 0] = 0.0  # distance 0 is counted once
    return left + right


def _mean_distance(p: torch.Tensor, pos: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, H, C) sum_j p_ij |pos_i - j| for a chunk p (B, H, C, Nk).

    Causal rows hold no mass beyond pos_i, so the distance is sum_j p_ij (pos_i - j), a matrix-vector
    product; keys are centred on the chunk to keep float32 cancellation small. Noncausal: elementwise.
    """
    n_kv = p.shape[-1]
    keys = torch.arange(n_kv, dtype=torch.float64)
    if causal:
        centre = float(pos.double().mean())
        rel = (keys - centre).to(device=p.device, dtype=p.dtype)  # (Nk,)
        shift = (pos.double() - centre).to(device=p.device, dtype=p.dtype)  # (C,)
        return shift * p.sum(-1) - p @ rel
    gap = (keys[None, :] - pos[:, None].double()).abs().to(device=p.device, dtype=p.dtype)  # (C, Nk)
    return (p * gap).sum(-1)


def _entropy(p: torch.Tensor, ctx: CallContext) -> torch.Tensor:
    """(B, H, C) row entropies -sum_j p_ij log p_ij (0 log 0 = 0) of a chunk p (B, H, C, W).

    When the attention call offers the chunk's logits (``ctx.chunk_logits``, log p = logits - lse),
    H = lse - sum_j p_j logits_j: one dot product per row, no log pass over the chunk.
    """
    logits, log_z = ctx.chunk_logits, ctx.chunk_log_norm
    if logits is not None and logits.shape[:-1] == p.shape[:-1] and logits.shape[-1] >= p.shape[-1]:
        w = p.shape[-1]
        lg = logits[..., :w]
        dot = torch.einsum("bhcw,bhcw->bhc", p, lg)  # measured ~5x faster than bmm of (1, W) x (W, 1)
        return log_z.to(p.dtype) - dot
    return torch.special.entr(p).sum(-1)


def _diagonal_ok(ctx: CallContext, p: torch.Tensor, pos: torch.Tensor) -> bool:
    """Whether :func:`_distance_histogram_stats` applies: causal, unpadded, consecutive positions."""
    c = p.shape[-2]
    if not ctx.causal or ctx.key_padding is not None or p.stride(-1) != 1 or c < 1:
        return False
    p0 = int(pos[0])
    return p.shape[-1] == p0 + c and bool((pos == torch.arange(p0, p0 + c)).all())


def _distance_histogram_stats(p: torch.Tensor, p0: int, n_buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed distance and locality mass per head, (H,) and (H, n_buckets) float64, for a causal chunk.

    p: (B, H, C, p0 + C), query row i at position p0 + i (all rows real; masked keys exactly 0, as the
    observer contract says). The mass at each distance d = p0 + i - j, summed over rows, is read from
    two skewed strided views of p (row stride + 1), one reduction each, no copy:
    near[i, t] = p[i, i + t], t in [0, p0] (distance p0 - t), and, for the first keys j < i,
    far[i, t] = p[i, i + t - (C - 1)], t in [0, C - 2] (distance p0 + C - 1 - t), rows i >= 1. A far
    element left of key 0 is the masked tail of row i - 1 (its key i + t + p0 + 1 > its position p0 + i - 1,
    whatever the row stride), so it is exactly 0.
    """
    b, h, c, w = p.shape
    sb, sh, sc, _ = p.stride()
    near = p.as_strided((b, h, c, p0 + 1), (sb, sh, sc + 1, 1), p.storage_offset())
    hist = torch.empty(h, p0 + c, dtype=torch.float64)
    hist[:, : p0 + 1] = near.sum(dim=(0, 2)).flip(-1).cpu()
    if c > 1:
        far = p.as_strided((b, h, c - 1, c - 1), (sb, sh, sc + 1, 1), p.storage_offset() + sc + 1 - (c - 1))
        hist[:, p0 + 1 :] = far.sum(dim=(0, 2)).flip(-1).cpu()  # distances p0 + 1 .. p0 + C - 1
    d = torch.arange(p0 + c, dtype=torch.float64)
    loc = torch.zeros(h, n_buckets, dtype=torch.float64).index_add_(1, _buckets(p0 + c), hist)
    return hist @ d, loc


_BUCKETS = torch.zeros(0, dtype=torch.long)


def _buckets(n: int) -> torch.Tensor:
    """bucket_of(arange(n)), from a cached table (grown when needed)."""
    global _BUCKETS
    if _BUCKETS.numel() < n:
        _BUCKETS = bucket_of(torch.arange(max(n, 2 * _BUCKETS.numel())))
    return _BUCKETS[:n]


class HeadStatsObserver(Observer):
    """Streaming entropy, mean distance and locality profile per (layer, head)."""

    narrow_ok = True

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._s: dict[int, dict[str, torch.Tensor]] = {}
        self.n_layers: int | None = None
        self._max_distance = 0

    def observe(self, ctx: CallContext, q_start: int, probs: torch.Tensor) -> None:
        b, h, c, _ = probs.shape
        n_kv = ctx.n_kv
        self.n_layers = ctx.n_layers
        lim = min(key_limit(ctx, q_start, c), probs.shape[-1])
        p = probs.detach().float()[..., :lim]  # keys beyond hold no mass
        pos = chunk_positions(ctx, q_start, c)
        real = query_valid(ctx, q_start, c, b)  # (B, C)
        if ctx.key_padding is not None:  # padded rows may hold anything, even NaN
            p = p.masked_fill(~real[:, None, :, None].to(p.device), 0.0)
        valid = real.double()
        n_vis = visible_per_query(ctx, q_start, c, b)  # (B, C)
        self._max_distance = max(self._max_distance, int(pos.max()), n_kv - 1 - int(pos.min()))
        nb = self._max_distance.bit_length() + 1  # = bucket_of(max distance) + 1
        s = self._s.get(ctx.layer)
        if s is None:
            s = self._s[ctx.layer] = {k: torch.zeros(h, dtype=torch.float64) for k in
                                      ("rows", "rows_norm", "entropy", "entropy_norm", "distance")}
            s["locality"] = torch.zeros(h, MAX_BUCKETS, dtype=torch.float64)
        ent = _entropy(p, ctx).cpu().double()  # (B, H, C)
        log_n = n_vis.double().log()
        norm_ok = (n_vis > 1).double() * valid  # (B, C)
        w = valid[:, None]
        s["rows"] += valid.sum()
        s["rows_norm"] += norm_ok.sum()
        s["entropy"] += (ent * w).sum((0, 2))
        s["entropy_norm"] += (ent / log_n.clamp_min(1e-30)[:, None] * norm_ok[:, None]).sum((0, 2))
        if _diagonal_ok(ctx, p, pos):
            dist, loc = _distance_histogram_stats(p, int(pos[0]), nb)
            s["distance"] += dist
            s["locality"][:, :nb] += loc
            return
        dist = _mean_distance(p, pos, ctx.causal).cpu().double()
        s["distance"] += (dist * w).sum((0, 2))
        s["locality"][:, :nb] += (_bucket_mass(p, pos, nb).cpu().double() * w[..., None]).sum((0, 2))

    def result(self) -> dict:
        """``{"per_head": {"entropy", "entropy_normalized", "mean_distance": [L][H]},
        "locality": [L][H][n_buckets], "locality_buckets": labels}`` (None for unseen layers)."""
        nb = self._max_distance.bit_length() + 1
        keys = ("entropy", "entropy_normalized", "mean_distance")
        per_head = {k: [] for k in keys}
        loc = []
        for layer in range(self.n_layers or 0):
            s = self._s.get(layer)
            if s is None:
                for k in keys:
                    per_head[k].append(None)
                loc.append(None)
                continue
            rows = s["rows"].clamp_min(1)
            per_head["entropy"].append((s["entropy"] / rows).tolist())
            per_head["entropy_normalized"].append((s["entropy_norm"] / s["rows_norm"].clamp_min(1)).tolist())
            per_head["mean_distance"].append((s["distance"] / rows).tolist())
            loc.append((s["locality"][:, :nb] / rows[:, None]).tolist())
        return {"per_head": per_head, "locality": loc, "locality_buckets": bucket_labels(nb)}


def head_stats(
    attentions: Sequence[torch.Tensor], *, causal: bool, key_padding: torch.Tensor | None = None
) -> dict:
    """The same statistics as :class:`HeadStatsObserver`, from full (B, H, N, N) maps, in float64."""
    n = attentions[0].shape[-1]
    b = attentions[0].shape[0]
    kp = torch.ones(b, n, dtype=torch.bool) if key_padding is None else key_padding.bool()
    allowed = kp[:, :, None] & kp[:, None, :]
    if causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()[None]
    n_vis = allowed.sum(-1).double()  # (B, N)
    qreal = kp.double()
    idx = torch.arange(n)
    dist = (idx[:, None] - idx[None, :]).abs()
    buckets = bucket_of(dist)
    nb = int(buckets.max()) + 1
    per_head = {"entropy": [], "entropy_normalized": [], "mean_distance": []}
    loc = []
    for a in attentions:
        a = torch.where(allowed[:, None], a.double(), 0.0)  # padded rows may hold anything
        ent = -(torch.where(a > 0, a * a.log(), 0.0)).sum(-1)  # (B, H, N)
        rows = qreal.sum()
        per_head["entropy"].append(((ent * qreal[:, None]).sum((0, 2)) / rows).tolist())
        ok = qreal * (n_vis > 1)
        norm = ent / torch.where(n_vis > 1, n_vis.log(), 1.0)[:, None]
        per_head["entropy_normalized"].append(((norm * ok[:, None]).sum((0, 2)) / ok.sum().clamp_min(1)).tolist())
        per_head["mean_distance"].append((((a * dist).sum(-1) * qreal[:, None]).sum((0, 2)) / rows).tolist())
        mass = torch.stack([(a * (buckets == k)).sum(-1) for k in range(nb)], -1)  # (B, H, N, nb)
        loc.append(((mass * qreal[:, None, :, None]).sum((0, 2)) / rows).tolist())
    return {"per_head": per_head, "locality": loc, "locality_buckets": bucket_labels(nb)}
