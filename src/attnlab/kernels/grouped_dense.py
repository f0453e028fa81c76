"""Grouped dense attention: patterns whose queries come in groups that share one key window.

In a strided neighborhood ("Generalized Neighborhood Attention: Multi-dimensional Sparse Attention
at the Speed of Light", Hassani et al., 2025), in HaloNet's blocked attention ("Scaling Local
Self-Attention for Parameter Efficient Visual Backbones", Vaswani et al., 2021) and in non-causal
packed documents, every query of a group (a stride tile, a block, a document) sees exactly the same
keys: the group's window. The pattern is then a batch of small DENSE attentions with no mask,
(group queries) x (group's window keys), which one call of PyTorch SDPA runs (cuDNN on Hopper,
the fastest attention there) with the groups folded into the batch axis.

The geometry comes from the per-axis windows of ``triton_local.axes_for`` (interval-separable
patterns). On each axis, queries with equal windows form a group, and groups form *segments*: in
1-D, consecutive groups with equal lengths and evenly spaced starts (viewable); in n-D, all groups
of equal query count and window length (gathered). A *class* is one segment per axis (interior,
border rows, corners, ...), and each class is one SDPA call.

- 1-D classes are copy-free: queries and windows are ``as_strided`` views of q, k, v
  (G, B*H, L, D), groups on the batch axis (windows overlap in memory; nothing is copied). The
  output of each class is copied once into its rows of the result.
- 2-D/3-D classes gather their query rows and window keys (``index_select``; a window is a box of
  the grid, not one run of memory), so K/V are copied (kernel / stride) times per axis.

Exact: no mask is evaluated anywhere; rows whose window is empty are zeros. Differentiable (SDPA,
views, copies and index_put all have a backward).

Measured (benchmarks/results/h200_kernels_s4.md, H200, bf16, 16 heads, D=128): 1-D strided NA at 32K
(k=2048, s=256) 0.82 of the ideal speed-up (Triton local kernel 0.73; cuDNN takes the overlapping views
as they are), documents 0.87-0.97; 2-D strided NA / HaloNet 0.20 / 0.15, because the gathers cost
more than the attention (on pre-gathered windows cuDNN reaches 0.84-0.87 / 0.77-0.80). On the 2-core
CPU it beats FlexAttention and the banded path by 1.1-5.4x (benchmarks/results/cpu_grouped.md).
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MIN_GROUP = 64  # mean queries per group below which ``plan`` declines: tiny GEMMs lose to the local kernels
MAX_CLASSES = 64  # SDPA calls per attention above which ``plan`` declines (launch cost)


@dataclass(frozen=True)
class Segment:
    """Groups of one axis run together: group g has queries ``q_starts[g] + [0, q_len)`` and keys
    ``k_starts[g] + [0, k_len)`` (k_len == 0: those queries see nothing)."""

    q_starts: tuple[int, ...]
    q_len: int
    k_starts: tuple[int, ...]
    k_len: int

    @property
    def count(self) -> int:
        return len(self.q_starts)

    @property
    def q_step(self) -> int:
        """Spacing of the query starts (1-D segments are evenly spaced; a single group: its length)."""
        return self.q_starts[1] - self.q_starts[0] if self.count > 1 else self.q_len

    @property
    def k_step(self) -> int:
        return self.k_starts[1] - self.k_starts[0] if self.count > 1 else self.k_len


@dataclass(frozen=True)
class Plan:
    """All segments per axis, for one pattern and lengths. A class is one segment per axis."""

    q_grid: tuple[int, ...]
    kv_grid: tuple[int, ...]
    segments: tuple[tuple[Segment, ...], ...]  # per axis
    has_empty: bool  # some query sees no key: the output starts as zeros

    @functools.cached_property
    def classes(self) -> list[tuple[Segment, ...]]:
        """One segment per axis, every combination (product over axes), empty windows dropped."""
        out = [()]
        for segs in self.segments:
            out = [c + (s,) for c in out for s in segs if s.k_len > 0]
        return out

    @property
    def pairs(self) -> int:
        """(query, key) pairs computed, summed over classes: the element count of the pattern."""
        return sum(math.prod(s.count * s.q_len * s.k_len for s in c) for c in self.classes)

    @property
    def mean_group(self) -> float:
        """Queries per SDPA batch entry, averaged over the queries (what sets the GEMM sizes)."""
        n = math.prod(self.q_grid)
        return n / sum(math.prod(s.count for s in c) for c in self.classes) if self.classes else 0.0


# ----------------------------------------------------------------------------------------------
# Geometry: per-axis windows -> groups -> segments.
# ----------------------------------------------------------------------------------------------


def axis_groups(lo: torch.Tensor, hi: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """Groups of one axis, (q_start, q_len, k_start, k_len), from its windows: query x sees keys
    [lo[x], hi[x]) (exclusive; hi <= lo: none). Windows never decrease, so equal ones are runs."""
    lo, hi = lo.tolist(), torch.maximum(hi, lo).tolist()
    groups: list[tuple[int, int, int, int]] = []
    for x, (a, b) in enumerate(zip(lo, hi)):
        if groups and (groups[-1][2], groups[-1][2] + groups[-1][3]) == (a, b) and b > a:
            groups[-1] = (groups[-1][0], groups[-1][1] + 1, a, b - a)
        elif groups and groups[-1][3] == 0 and b == a:  # empty windows: one group, whatever the bounds
            groups[-1] = (groups[-1][0], groups[-1][1] + 1, 0, 0)
        else:
            groups.append((x, 1, a if b > a else 0, b - a))
    return groups


def evenly_spaced(groups) -> tuple[Segment, ...]:
    """1-D segments: consecutive groups with equal lengths whose query and key starts keep one step
    (what ``fold`` can view without a copy)."""
    segs: list[list] = []  # [q_starts, q_len, k_starts, k_len]
    for qs, ql, ks, kl in groups:
        if segs and segs[-1][1] == ql and segs[-1][3] == kl:
            q0, k0 = segs[-1][0], segs[-1][2]
            if len(q0) == 1 or (qs - q0[-1] == q0[1] - q0[0] and ks - k0[-1] == k0[1] - k0[0]):
                q0.append(qs)
                k0.append(ks)
                continue
        segs.append([[qs], ql, [ks], kl])
    return tuple(Segment(tuple(a), b, tuple(c), d) for a, b, c, d in segs)


def by_lengths(groups) -> tuple[Segment, ...]:
    """n-D segments (gathered, so starts need no common step): groups of equal lengths together.

    Merged border groups (equal windows, e.g. the first two stride tiles of a neighborhood) are
    split back into groups of the most common length first, so that a tile-aligned strided
    pattern is one class: one SDPA call instead of one per border row and corner.
    """
    counts: dict[int, int] = {}
    for _qs, ql, _ks, _kl in groups:
        counts[ql] = counts.get(ql, 0) + 1
    unit = max(counts, key=lambda n: (counts[n], n))
    split = []
    for qs, ql, ks, kl in groups:
        parts = ql // unit if ql % unit == 0 else 1
        step = ql // parts
        split += [(qs + i * step, step, ks, kl) for i in range(parts)]
    buckets: dict[tuple[int, int], tuple[list, list]] = {}
    for qs, ql, ks, kl in split:
        qb, kb = buckets.setdefault((ql, kl), ([], []))
        qb.append(qs)
        kb.append(ks)
    return tuple(Segment(tuple(qb), ql, tuple(kb), kl) for (ql, kl), (qb, kb) in buckets.items())


def build_plan(axes) -> Plan:
    """Plan from ``triton_local.Axis`` bounds (one per grid axis): evenly spaced segments in 1-D
    (copy-free views), segments by lengths in n-D (gathers)."""
    groups = [axis_groups(a.lo, a.hi) for a in axes]
    segments = tuple((evenly_spaced if len(axes) == 1 else by_lengths)(g) for g in groups)
    has_empty = any(s.k_len == 0 for segs in segments for s in segs)
    return Plan(tuple(a.n_q for a in axes), tuple(a.n_kv for a in axes), segments, has_empty)


@functools.lru_cache(maxsize=64)
def cached_plan(pattern, n_q: int, n_kv: int) -> Plan | None:
    """Plan of a pattern (frozen dataclasses hash by value), or None if it is not interval-separable."""
    from .triton_local import axes_for

    try:
        axes = axes_for(pattern, n_q, n_kv)
    except ValueError:
        return None
    return None if axes is None else build_plan(axes)


def plan(pattern, n_q: int, n_kv: int, *, min_group: float = MIN_GROUP) -> Plan | None:
    """The plan if grouped dense attention suits this call: interval-separable pattern, on average
    at least ``min_group`` queries per group and at most MAX_CLASSES SDPA calls; else None."""
    p = cached_plan(pattern, n_q, n_kv)
    if p is None or len(p.classes) > MAX_CLASSES or p.mean_group < min_group:
        return None
    return p


# ----------------------------------------------------------------------------------------------
# Running a class: 1-D views, n-D gathers.
# ----------------------------------------------------------------------------------------------


def fold(t: torch.Tensor, start: int, step: int, count: int, length: int) -> torch.Tensor:
    """(B, H, N, D) -> (count, B*H, length, D) view: group g is rows start + g*step + [0, length).

    Needs B and H foldable into one stride (``foldable``: contiguous (B, H, N, D), B == 1 or H == 1);
    no copy.
    """
    b, h, _, d = t.shape
    sb, sh, sn, sd = t.stride()
    assert foldable(t), "fold needs B and H on one stride"
    return t.as_strided((count, b * h, length, d), (step * sn, sb if h == 1 else sh, sn, sd), t.storage_offset() + start * sn)


def foldable(t: torch.Tensor) -> bool:
    b, h = t.shape[:2]
    return b == 1 or h == 1 or t.stride(0) == h * t.stride(1)


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


_views_refused: dict[tuple, str] = {}  # (device type, dtype, D, Dv) -> why SDPA refused overlapping views


def _sdpa_views(q, k, v, scale):
    """SDPA on the folded views; if a backend refuses their strides but takes contiguous copies,
    on copies from then on (remembered per device, dtype and head dims, with a warning)."""
    key = (q.device.type, q.dtype, q.shape[-1], v.shape[-1])
    if key in _views_refused:
        return _sdpa(q.contiguous(), k.contiguous(), v.contiguous(), scale)
    try:
        return _sdpa(q, k, v, scale)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        out = _sdpa(q.contiguous(), k.contiguous(), v.contiguous(), scale)  # fails too: not the views' fault
        _views_refused[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        warnings.warn(f"SDPA refused strided key windows {key} ({_views_refused[key]}); copying them",
                      RuntimeWarning, stacklevel=3)
        return out


def run_1d(q, k, v, seg: Segment, out: torch.Tensor, scale: float, copy: bool = False) -> None:
    """One 1-D segment as views: SDPA over (count, B*H, L, D), written into ``out`` (B, Hq, Nq, Dv).

    ``copy=True`` makes the views contiguous first (to measure what the copy-free views save).
    """
    c, q0, k0 = seg.count, seg.q_starts[0], seg.k_starts[0]
    qv = fold(q, q0, seg.q_step, c, seg.q_len)
    kv = fold(k, k0, seg.k_step, c, seg.k_len)
    vv = fold(v, k0, seg.k_step, c, seg.k_len)
    if copy:
        qv, kv, vv = qv.contiguous(), kv.contiguous(), vv.contiguous()
    # GQA works across the fold: query row b*Hq + h meets key row (b*Hq + h) // r = b*Hkv + h // r.
    res = _sdpa_views(qv, kv, vv, scale)  # (count, B*Hq, q_len, Dv)
    fold(out, q0, seg.q_step, c, seg.q_len).copy_(res)


def class_indices(cls: tuple[Segment, ...], q_grid, kv_grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major token ids of one class: queries (G, S) and window keys (G, W), G groups."""

    def ids(grid, starts_lens):
        flat = torch.zeros(1, 1, dtype=torch.long)
        for size, (starts, length) in zip(grid, starts_lens):
            coord = starts[:, None] + torch.arange(length)[None, :]  # (G_a, L_a)
            flat = (flat[:, None, :, None] * size + coord[None, :, None, :]).flatten(2).flatten(0, 1)
        return flat

    q_sl = [(torch.tensor(s.q_starts), s.q_len) for s in cls]
    k_sl = [(torch.tensor(s.k_starts), s.k_len) for s in cls]
    return ids(q_grid, q_sl), ids(kv_grid, k_sl)


@functools.lru_cache(maxsize=64)
def _indices(plan: Plan, device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    return tuple(tuple(t.to(device) for t in class_indices(c, plan.q_grid, plan.kv_grid)) for c in plan.classes)


def run_gathered(q, k, v, qidx: torch.Tensor, kidx: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """One class by gathers: qidx (G, S), kidx (G, W) token ids; writes rows qidx of ``out`` (B, Hq, Nq, Dv).

    Tokens are gathered from the (B, N, H, D) view so that each group lands as a (B*G, S, H, D)
    block, which SDPA reads as (B*G, H, S, D) with strides (the BSHD layout its kernels take).
    """
    b, g, s, w = q.shape[0], *qidx.shape, kidx.shape[1]

    def gather(t, idx, n):
        rows = t.transpose(1, 2).index_select(1, idx.flatten())  # (B, G*n, H, D)
        return rows.view(b * g, n, t.shape[1], t.shape[3]).transpose(1, 2)  # (B*G, H, n, D)

    res = _sdpa(gather(q, qidx, s), gather(k, kidx, w), gather(v, kidx, w), scale)  # (B*G, Hq, S, Dv)
    res = res.view(b, g, res.shape[1], s, res.shape[3]).permute(0, 2, 1, 3, 4)  # (B, Hq, G, S, Dv)
    out[:, :, qidx] = res


def grouped_dense(q, k, v, plan: Plan, scale: float, *, copy_views: bool = False) -> torch.Tensor:
    """Attention of a grouped pattern: one SDPA call per class of groups.

    Args:
        q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv), row-major token order of the grids.
        plan: from ``plan`` / ``cached_plan`` for this pattern and these lengths.
        scale: multiplier of q k^T.
        copy_views: 1-D only: copy the views to contiguous tensors first (benchmarks).

    Returns:
        (B, Hq, Nq, Dv) in q's dtype, contiguous. Rows with an empty window are zeros.
    """
    b, hq, n_q, _ = q.shape
    alloc = torch.zeros if plan.has_empty else torch.empty
    out = alloc(b, hq, n_q, v.shape[-1], dtype=q.dtype, device=q.device)
    if len(plan.q_grid) == 1:
        if all(foldable(t) for t in (q, k, v)):
            for (seg,) in plan.classes:
                run_1d(q, k, v, seg, out, scale, copy_views)
        else:  # e.g. (B, N, H, D) storage with B > 1: fold each batch row on its own
            for i in range(b):
                sl = slice(i, i + 1)
                for (seg,) in plan.classes:
                    run_1d(q[sl], k[sl], v[sl], seg, out[sl], scale, copy_views)
        return out
    for qidx, kidx in _indices(plan, q.device):
        run_gathered(q, k, v, qidx, kidx, out, scale)
    return out


def run_pattern(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern, scale: float) -> torch.Tensor:
    """The dispatcher's entry (``attnlab.attention(..., kernel="grouped")``). Shapes as in ``grouped_dense``.

    Raises NotImplementedError with the reason when the pattern has no shared-window groups
    (not interval-separable, e.g. dilation > 1; or a grid pattern on mismatched lengths).
    """
    p = cached_plan(pattern, q.shape[2], k.shape[2])
    if p is None:
        raise NotImplementedError(f"pattern {pattern!r} is not interval-separable for Nq={q.shape[2]}, Nk={k.shape[2]}")
    return grouped_dense(q, k, v, p, scale)


def main() -> None:
    from ..core.patterns import blocked, neighborhood

    for pat, n in ((neighborhood(32, 8, stride=4), 32), (blocked((12, 12), 4, 2), 144)):
        p = cached_plan(pat, n, n)
        print(pat, f"classes={len(p.classes)} mean group={p.mean_group:.1f}")
        for axis, segs in enumerate(p.segments):
            print(f" axis {axis}:", *segs, sep="\n   ")


if __name__ == "__main__":
    main()
