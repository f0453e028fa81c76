"""The banded path: one SDPA call over overlapping key windows, for band-shaped patterns.

When each block of ``bq`` queries needs only one contiguous span of keys (sliding windows, 1-D
neighborhoods, HaloNet-like blocks in 1-D, prefix-free local patterns), attention of that block is
an ordinary SDPA over its span with a small boolean mask for the window edges. The spans of the
interior blocks start at a constant stride, so they are an overlapping ``as_strided`` view of K
and V: no copy of K/V, and all blocks go through one SDPA call, whose "heads" axis is the block
index. The blocks before and after that run (borders, where windows are clipped or shift inward,
and the ragged last block) run as one block each side: their real query rows against the union of
their key spans, again slices of q, k, v with one mask; only where that union is wider than twice a
block's span are the blocks gathered with a mask each. The result is exact (the edge mask comes from
the pattern's own mask_mod), and the work is Nq x S instead of Nq x Nk, with S the widest span.

It does not take a score_mod, and it pays off only when S is well below Nk (``plan`` returns
``None`` otherwise). On this project's 2-core CPU it is attnlab's fastest exact path for 1-D
windows; see ``benchmarks/results/cpu_kernels.md``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Q_BLOCK = 32  # queries per block: smaller wastes less span, larger makes bigger GEMMs
KV_GRAIN = 16  # granularity of the key spans read from the pattern's block layout
MAX_WORK = 0.5  # use the band only if it does at most this fraction of the dense work
# Strided blocks per SDPA call: one call over all blocks returns a large fresh output that page-faults
# on first touch and is then copied out; calls of 32 blocks keep each output small (window 257 at 8K,
# 16 heads, CPU: window medians 170-178 vs 185-188 ms in two interleaved A/B runs; 16 and 64: no gain).
STRIDED_CHUNK = 32


@dataclass(frozen=True)
class Group:
    """Blocks run in one SDPA call: query rows (n, bq) and key columns (n, S), their mask (n, bq, S)."""

    blocks: torch.Tensor  # (n,) block indices
    q_rows: torch.Tensor  # (n, bq) int64, clamped to Nq - 1 in the last block
    kv_start: torch.Tensor  # (n,) int64, first key of each span
    mask: torch.Tensor  # (n, bq, S) bool
    empty_rows: torch.Tensor | None  # (r,) query indices that see no key, or None
    strided: bool  # True: spans start at blocks * bq + const and rows are whole blocks

    def __hash__(self):  # held in an lru_cache value only
        return id(self)


@dataclass(frozen=True)
class BandPlan:
    n_q: int
    n_kv: int
    bq: int
    span: int
    groups: tuple[Group, ...]
    work: float  # band work / dense work
    strided_fraction: float  # share of query blocks in the strided run (the interior)
    gathered_blocks: int  # query blocks outside it (borders: one block per side, or gathered)

    def __hash__(self):
        return id(self)


def _spans(pattern, n_q: int, n_kv: int, bq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block, the first key and one past the last key it may need: two (nb,) int64."""
    layout = pattern.block_layout(n_q, n_kv, bq, KV_GRAIN)
    touched = layout.full | layout.partial  # (nb, nKb)
    nkb = touched.shape[1]
    any_ = touched.any(1)
    first = torch.argmax(touched.to(torch.int8), 1)
    last = nkb - 1 - torch.argmax(touched.flip(1).to(torch.int8), 1)
    lo = torch.where(any_, first * KV_GRAIN, 0)
    hi = torch.where(any_, torch.clamp((last + 1) * KV_GRAIN, max=n_kv), 0)
    return lo, hi


def _longest_run(same: torch.Tensor) -> tuple[int, int]:
    """Longest run [i, j) of blocks with block t equal to block t - 1 for all i < t < j (same: (nb,) bool)."""
    best, best_len, start = 0, 0, 0
    flags = same.tolist() + [False]
    for t in range(1, len(flags)):
        if not flags[t]:
            if t - start > best_len:
                best, best_len = start, t - start
            start = t
    return best, best + best_len


def _group(blocks, q_rows, kv_start, mask, real, strided, device) -> Group:
    empty = ~mask.any(-1) & real  # real queries (not the last block's padding) that see no key
    empty_rows = q_rows[empty] if bool(empty.any()) else None
    if strided:
        mask = mask[0]  # all blocks of a strided group share one (bq, S) mask: SDPA broadcasts it
    return Group(
        blocks=blocks.to(device),
        q_rows=q_rows.to(device),
        kv_start=kv_start.to(device),
        mask=mask.contiguous().to(device),
        empty_rows=None if empty_rows is None else empty_rows.to(device),
        strided=strided,
    )


def _visible(pattern, n_q: int, n_kv: int, rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The pattern's mask at query ``rows`` x key ``keys`` (broadcast against each other), as bool."""
    zero = torch.zeros((), dtype=torch.long)
    mask = pattern.mask_mod(n_q, n_kv)(zero, zero, rows, keys)
    return mask.expand(torch.broadcast_shapes(rows.shape, keys.shape))


def _border(pattern, n_q: int, n_kv: int, bq: int, span: int, a: int, b: int, start: torch.Tensor,
            device: torch.device) -> Group | None:
    """Query blocks a .. b-1 as one strided group of a single block: their real rows against the union
    of their key spans (slices: no gather, no per-block mask), or None when that union is wider than twice
    a block's span (too much masked work). Window 257 at 8K on CPU: the gathers were 9 ms of a 158 ms
    profiled call; interleaved with the gathered borders, medians 149 vs 151 ms (9 rounds)."""
    lo, hi = int(start[a:b].min()), int(start[a:b].max()) + span
    width = min(-(-(hi - lo) // 8) * 8, n_kv)
    if width > 2 * span:
        return None
    lo = min(lo, n_kv - width)
    rows = torch.arange(a * bq, min(b * bq, n_q))
    mask = _visible(pattern, n_q, n_kv, rows[:, None], torch.arange(lo, lo + width)[None, :])
    real = torch.ones(1, len(rows), dtype=torch.bool)
    return _group(torch.tensor([a]), rows[None], torch.tensor([lo]), mask[None], real, True, device)


@functools.lru_cache(maxsize=16)
def plan(
    pattern, n_q: int, n_kv: int, device: torch.device, bq: int = Q_BLOCK, max_work: float = MAX_WORK
) -> BandPlan | None:
    """Split the query blocks into a strided group and an edge group, or None if the band is too wide.

    The strided group is the longest run of whole blocks whose key spans start at a constant stride
    and whose (bq, S) masks are equal (the interior of a window): it runs copy-free with one shared
    mask (a per-block mask costs SDPA on CPU several times more). The other blocks (borders, the
    ragged last block) are gathered, each with its own mask.
    """
    lo, hi = _spans(pattern, n_q, n_kv, bq)
    nb = lo.numel()
    span = max(int((hi - lo).max()), 1)  # 1: every query is masked; keeps the shapes valid
    span = min(-(-span // 8) * 8, n_kv)
    work = nb * bq * span / (n_q * n_kv)
    if work > max_work:
        return None
    start = torch.clamp(lo, max=n_kv - span)  # spans shift inward at the end, as NATTEN's windows do
    blocks = torch.arange(nb)
    pos = blocks[:, None] * bq + torch.arange(bq)  # (nb, bq)
    real = pos < n_q
    q_rows = torch.clamp(pos, max=n_q - 1)
    kv = start[:, None] + torch.arange(span)  # (nb, S)
    mask = _visible(pattern, n_q, n_kv, q_rows[:, :, None], kv[:, None, :])  # (nb, bq, S)
    offset = start - blocks * bq
    same = torch.zeros(nb, dtype=torch.bool)
    same[1:] = (offset[1:] == offset[:-1]) & (mask[1:] == mask[:-1]).flatten(1).all(1)
    whole = real.all(1)
    same &= whole
    i, j = _longest_run(same)
    strided = torch.zeros(nb, dtype=torch.bool)
    if bool(whole[i]):
        strided[i:j] = True
    groups = []
    has_run = bool(strided.any())
    if has_run:
        groups.append(_group(blocks[i:j], q_rows[i:j], start[i:j], mask[i:j], real[i:j], True, device))
    for a, b in ((0, i), (j, nb)) if has_run else ((0, nb),):
        if b > a:
            groups.append(_border(pattern, n_q, n_kv, bq, span, a, b, start, device)
                          or _group(blocks[a:b], q_rows[a:b], start[a:b], mask[a:b], real[a:b], False, device))
    return BandPlan(n_q, n_kv, bq, span, tuple(groups), work, float(strided.float().mean()), int((~strided).sum()))


def _fold(x: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """(Hq, n, bq, D) -> (Hkv, n, G * bq, D): a GQA group's queries share one key window."""
    hq, n, bq, d = x.shape
    g = hq // n_kv_heads
    if g == 1:
        return x
    return x.view(n_kv_heads, g, n, bq, d).transpose(1, 2).reshape(n_kv_heads, n, g * bq, d)


def _unfold(o: torch.Tensor, g: int) -> torch.Tensor:
    """(Hkv, n, G * bq, Dv) -> (Hq, n * bq, Dv)."""
    hkv, n, gbq, dv = o.shape
    bq = gbq // g
    return o.view(hkv, n, g, bq, dv).transpose(1, 2).reshape(hkv * g, n * bq, dv)


@functools.lru_cache(maxsize=64)
def _sdpa_mask(group: Group, dtype: torch.dtype, g: int) -> torch.Tensor:
    """The group's bool mask as 0 / -inf in the inputs' dtype (SDPA's CPU kernel adds it without
    converting), rows repeated for a GQA group of g heads, 2-D or 4-D (a 3-D mask sends CPU SDPA
    to its math path). Cached: building it costs more than a small call."""
    mask = group.mask  # (bq, S) strided, (n, bq, S) gathered
    if g > 1:
        mask = mask.repeat(*([1] * (mask.dim() - 2)), g, 1)  # (.., G * bq, S), rows ordered like _fold's
    if mask.dim() == 3:
        mask = mask.unsqueeze(0)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _run_group(q, k, v, out, group: Group, scale: float) -> None:
    """Attention of one group of blocks for every batch element, written into ``out`` (B, Hq, Nq, Dv)."""
    B, Hq, _, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    G = Hq // Hkv
    n, bq = group.q_rows.shape
    span = group.mask.shape[-1]
    mask = _sdpa_mask(group, q.dtype, G)
    for b in range(B):
        qb, kb, vb = q[b], k[b], v[b]  # (H, N, D)
        if group.strided:
            r0 = int(group.q_rows[0, 0])
            s0 = int(group.kv_start[0])
            qs = qb[:, r0 : r0 + n * bq].unflatten(1, (n, bq))  # (Hq, n, bq, D), a view
            ks = kb.as_strided((Hkv, n, span, D), (kb.stride(0), bq * kb.stride(1), kb.stride(1), kb.stride(2)),
                               kb.storage_offset() + s0 * kb.stride(1))
            vs = vb.as_strided((Hkv, n, span, Dv), (vb.stride(0), bq * vb.stride(1), vb.stride(1), vb.stride(2)),
                               vb.storage_offset() + s0 * vb.stride(1))
            for c0 in range(0, n, STRIDED_CHUNK):
                c1 = min(n, c0 + STRIDED_CHUNK)
                o = F.scaled_dot_product_attention(_fold(qs[:, c0:c1], Hkv), ks[:, c0:c1], vs[:, c0:c1],
                                                   attn_mask=mask, scale=scale)
                out[b, :, r0 + c0 * bq : r0 + c1 * bq] = _unfold(o, G)  # (Hq, (c1 - c0) * bq, Dv)
        else:
            kv_idx = (group.kv_start[:, None] + torch.arange(span, device=q.device)).flatten()
            qs = qb.index_select(1, group.q_rows.flatten()).view(Hq, n, bq, D)
            ks = kb.index_select(1, kv_idx).view(Hkv, n, span, D)
            vs = vb.index_select(1, kv_idx).view(Hkv, n, span, Dv)
            o = F.scaled_dot_product_attention(_fold(qs, Hkv), ks, vs, attn_mask=mask, scale=scale)
            o = _unfold(o, G)  # (Hq, n * bq, Dv)
            rows = group.q_rows.flatten()
            keep = (group.blocks[:, None] * bq + torch.arange(bq, device=q.device)).flatten() < q.shape[2]
            out[b][:, rows[keep]] = o[:, keep]
    if group.empty_rows is not None:
        out[:, :, group.empty_rows] = 0


def banded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern, scale: float, band: BandPlan) -> torch.Tensor:
    """Run a band plan. q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv)."""
    out = torch.empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3], dtype=q.dtype, device=q.device)
    for group in band.groups:
        _run_group(q, k, v, out, group, scale)
    return out
