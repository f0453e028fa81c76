"""Packed multi-group KV layers: every row of a layer in one flat buffer, ONE attention call per step.

A layer whose KV heads keep different numbers of entries (MoA's per-head windows, Task-KV's full and
compressed heads) holds several :class:`attnlab.kv.cache.Group` s; attending group by group costs one
SDPA call and one set of writes per group and a row permutation. On a launch-bound GPU (SmolLM2 decode:
~30 ms per step, time ~ ops launched) that made those policies slower than the full cache. Here instead:

* Layout: rows in natural order (row ``r = b * H_kv + kv_head``), row r owns the slots
  ``[start[r], start[r] + cap[r])`` of flat ``keys (S, 1, D)``, ``values (S, 1, D_v)`` and ``pos (S,)``;
  its ``n[r]`` entries are its first ``n[r]`` slots (rings overwrite in place, appends fill the slack).
  New keys (B, H_kv, 1, D) and queries (B, H_kv * rep, 1, D) are then views: no permutation.
* A decode step: ``index_copy_`` of the new keys and values at the step's write slots, then one
  variable-length attention call: 3 ops, one fewer than the plain one-group path (copy k, copy v,
  fill pos, SDPA), because the positions are known on the host and written lazily (``pos`` is brought
  up to date only when read: :meth:`PackedRows.positions`, when the tables are rebuilt, before
  :meth:`PackedRows.to_groups`). The write slots and the segment table of the next steps are
  precomputed on the host and copied to the device once (``tables``); a step picks its row with a host
  int (a view, no op), so nothing waits for the device.
* Segments: ``cu_k = [start0, start0 + len0, start1, start1 + len1, ...]``: row r is a segment and the
  unused slack between rows is a segment with zero queries (``cu_q`` repeats its value there:
  ``[0, rep, rep, 2 rep, ...]``), so one call serves rows with spare capacity. The ``rep`` query
  heads of a KV head are that row's queries (GQA without repeating keys).

Kernels (:func:`segment_attention`): on CUDA, ``torch.nn.attention.varlen.varlen_attn`` (flash) for
fp16 / bf16 and ``aten._efficient_attention_forward`` with ``cu_seqlens`` for float32 (flash has no
fp32; SmolLM2 runs in fp32 here); each is checked once per device and dtype against a float64 loop
before it is used (:func:`kernel_ok`), else the layer stays on the group path. On the CPU (where the
group path is the default: it is faster there), ``attnlab::segment_attention``, a custom op looping
over the segments, implements the same segment semantics exactly; being one op, it counts as one call
in ``OpCounter``, as the CUDA kernels do.

Measured (SmolLM2, 4,096 tokens, batch 8, H200, benchmarks/results/kv_speed_h200_s5.md): ops per step
moa 1603 -> 1455, task_kv 1594 -> 1464 (full 1581); decode speed vs full, fastest repeat's median step,
moa 0.92x -> 1.04x, task_kv 0.95x -> 1.04x in the same run.

Not packed (they stay on the group path): rows with a log weight (RazorAttention's compensation token:
plain varlen has no per-key bias), score tracking (H2O needs the probabilities), evictions that are not
host ints (a ring's slot must be known on the host), single-group layers (already one call). Multi-token
steps (T_q > 1) turn a packed layer back into groups (:meth:`PackedRows.to_groups`), exactly.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ---- the segment attention kernels


@torch.library.custom_op("attnlab::segment_attention", mutates_args=())
def _segment_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                           cu_k: torch.Tensor, max_q: int, max_k: int, scale: float) -> torch.Tensor:
    """Exact segment attention by a loop (the stand-in for the varlen kernels off CUDA).

    q (M, H, D), k (S, H, D), v (S, H, D_v), cu_q / cu_k (N + 1,) int32 non-decreasing: segment i's
    queries q[cu_q[i]:cu_q[i+1]] attend to keys k[cu_k[i]:cu_k[i+1]] (no mask). Returns (M, H, D_v).
    """
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[i], cq[i + 1], ck[i], ck[i + 1]
        if q1 == q0 or k1 == k0:  # a gap (no queries), or no keys: a fully masked row is zeros
            continue
        o = F.scaled_dot_product_attention(q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1),
                                           v[k0:k1].transpose(0, 1), scale=scale)
        out[q0:q1] = o.transpose(0, 1)
    return out


@_segment_attention_cpu.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


def _varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                      max_q: int, max_k: int, scale: float) -> torch.Tensor:
    """Variable-length attention over segments: (M, H, D) queries, (S, H, D) keys -> (M, H, D_v).

    ``cu_q``, ``cu_k``: (N + 1,) int32 on q's device; segment i's queries ``cu_q[i]:cu_q[i+1]`` see the
    keys ``cu_k[i]:cu_k[i+1]``; segments may have no queries (the gaps of a packed layer). ``max_q`` /
    ``max_k``: host ints bounding the segments' lengths.
    """
    if q.device.type != "cuda":
        return torch.ops.attnlab.segment_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale)
    if q.dtype in (torch.float16, torch.bfloat16) and _varlen() is not None:
        return _varlen()(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale)
    out = torch.ops.aten._efficient_attention_forward(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), None, cu_q, cu_k,
                                                      max_q, max_k, 0.0, 0, False, scale=scale)[0]
    return out.squeeze(0)


_KERNEL_OK: dict = {}


def kernel_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`segment_attention` on ``device`` / ``dtype`` matches a float64 loop on a small case with
    gaps and GQA (rows of capacity 10 holding 5 / 3 / 7 entries, 3 queries each). Checked once per device
    and dtype (one host sync, at compression); a failure warns and keeps layers on the group path."""
    key = (str(device), dtype)
    if key not in _KERNEL_OK:
        try:
            g = torch.Generator().manual_seed(0)
            D, rep, lens, cap = 64, 3, [5, 3, 7], 10
            k = torch.randn(cap * len(lens), 1, D, generator=g, dtype=torch.float64)
            v = torch.randn(cap * len(lens), 1, D, generator=g, dtype=torch.float64)
            q = torch.randn(rep * len(lens), 1, D, generator=g, dtype=torch.float64)
            cu_k = [x for r, n in enumerate(lens) for x in (r * cap, r * cap + n)]
            cu_q = [x for r in range(len(lens)) for x in (r * rep, (r + 1) * rep)]
            want = _segment_attention_cpu(q, k, v, torch.tensor(cu_q), torch.tensor(cu_k), rep, cap, 0.125)
            args = [t.to(device=device, dtype=dtype) for t in (q, k, v)]
            cus = [torch.tensor(c, dtype=torch.int32, device=device) for c in (cu_q, cu_k)]
            got = segment_attention(*args, *cus, rep, cap, 0.125).double().cpu()
            tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
            err = float((got - want).abs().max())
            _KERNEL_OK[key] = err <= tol
            if not _KERNEL_OK[key]:
                warnings.warn(f"packed KV attention on {device} / {dtype}: max error {err:.3g} > {tol}; "
                              "multi-group layers stay on the group path")
        except Exception as e:  # an unsupported kernel: fall back, say why
            warnings.warn(f"packed KV attention unavailable on {device} / {dtype} ({type(e).__name__}: {e}); "
                          "multi-group layers stay on the group path")
            _KERNEL_OK[key] = False
    return _KERNEL_OK[key]


# ---- the packed layout


@dataclass
class RingState:
    """What a policy's ``evict`` reads of a ring group (``n``, ``evicted``, ``ring``), for host-side slots."""

    n: int
    evicted: int
    ring: bool = True


@dataclass
class GroupSpec:
    """One former group: its rows (host list), entries, and how it decodes (see ``Group``)."""

    rows: list[int]
    n: int
    fixed_size: bool
    evicted: int
    ring: bool
    rings: bool  # True: a decoded token overwrites a host-known slot; False: it is appended


class PackedRows:
    """One layer's rows packed for one attention call per decode step (see the module docstring).

    Attributes:
        keys: (S, 1, D); values: (S, 1, D_v); pos: (S,) long token positions (-1: unused slot), up to date
            after :meth:`positions`.
        start, cap: per row (host lists), the row's first slot and its capacity.
        specs: the groups the rows came from (for eviction slots and :meth:`to_groups`).
        rep: query heads per KV head; reserve: slots added to appending rows when they are full.
    """

    def __init__(self, groups, n_rows: int, rep: int | None, policy, position: int, reserve: int):
        self.reserve = max(1, reserve)
        self.policy = policy
        self.rep = rep
        self.specs = [GroupSpec(g.rows.tolist(), g.n, g.fixed_size, g.evicted, g.ring,
                                _rings(g, policy, position)) for g in groups]
        self.spec_of = [None] * n_rows  # row -> its spec
        for s in self.specs:
            for r in s.rows:
                self.spec_of[r] = s
        self.n_rows = n_rows
        self.position = position  # the position the next decoded token has
        self.cap = [s.n if s.rings else s.n + self.reserve for s in self.spec_of]
        self.start = _starts(self.cap)
        dev, D, Dv = groups[0].keys.device, groups[0].keys.shape[-1], groups[0].values.shape[-1]
        S = self.start[-1] + self.cap[-1]
        self.keys = torch.zeros(S, 1, D, dtype=groups[0].keys.dtype, device=dev)
        self.values = torch.zeros(S, 1, Dv, dtype=groups[0].values.dtype, device=dev)
        self.pos = torch.full((S,), -1, dtype=torch.long, device=dev)
        for g in groups:
            dst = (torch.tensor([self.start[r] for r in g.rows.tolist()], device=dev).view(-1, 1)
                   + torch.arange(g.n, device=dev)).reshape(-1)
            self.keys.index_copy_(0, dst, g.keys[:, : g.n].reshape(-1, 1, D))
            self.values.index_copy_(0, dst, g.values[:, : g.n].reshape(-1, 1, Dv))
            self.pos.index_copy_(0, dst, g.pos[:, : g.n].reshape(-1))
        self._tables()

    # ---- host-side tables of the next steps
    def _tables(self) -> None:
        """Write slots (H, R) long, cu_k (H, 2R) int32 and max_k (host) for the next H steps, one copy each."""
        horizon = min([self.cap[r] - s.n for r, s in enumerate(self.spec_of) if not s.rings] or [self.reserve])
        slots, cu_k, max_k = [], [], []
        for step in range(horizon):
            row_slot, row_cu, longest = [], [], 1
            ring_slot = {id(s): _ring_slot(s, self.policy, step, self.position + step) for s in self.specs if s.rings}
            for r, s in enumerate(self.spec_of):
                if s.rings:
                    slot, length = ring_slot[id(s)], s.n
                else:
                    slot, length = s.n + step, s.n + step + 1
                row_slot.append(self.start[r] + slot)
                row_cu += [self.start[r], self.start[r] + length]
                longest = max(longest, length, self.cap[r] - length)  # gaps are segments too
            slots.append(row_slot)
            cu_k.append(row_cu)
            max_k.append(longest)
        dev = self.keys.device
        self.slots = torch.tensor(slots, dtype=torch.long, device=dev)  # (H, R)
        self.cu_k = torch.tensor(cu_k, dtype=torch.int32, device=dev)  # (H, 2R)
        self.max_k = max_k
        self.step = 0  # index into the tables
        self.pos_step = 0  # steps of these tables whose positions are written to ``pos``
        self.current = -1  # the table row of the step being attended
        if self.rep is not None:
            self._cu_q()

    def _cu_q(self) -> None:
        # (2R,) [0, rep, rep, 2 rep, ..., R rep]: the gaps between rows have no queries. Made on the device (no
        # host copy to wait for: rep is first known at the first decode step)
        R, rep = self.n_rows, self.rep
        self.cu_q = torch.arange(1, 2 * R + 1, dtype=torch.int32, device=self.keys.device) // 2 * rep

    def positions(self) -> torch.Tensor:
        """(S,) long ``pos`` with every decoded token's position written (one fill per step not yet written,
        in order: a ring slot overwritten twice keeps the later position)."""
        for step in range(self.pos_step, self.step):
            self.pos.index_fill_(0, self.slots[step], self.position + step)
        self.pos_step = self.step
        return self.pos

    def _fold(self) -> None:
        """Commit the steps taken with the current tables to the specs (n, evicted) and the next position."""
        self.positions()
        done = self.step
        for s in self.specs:
            if s.rings:
                s.evicted += done
            else:
                s.n += done
        self.position += done
        self.step, self.current, self.pos_step = 0, -1, 0

    def _advance(self) -> None:
        """The tables are used up: commit the steps, grow appending rows, rebuild the tables."""
        self._fold()
        if any(not s.rings for s in self.specs):
            self._grow()
        self._tables()

    def _grow(self) -> None:
        """Add ``reserve`` slots to every appending row: new buffers, the entries copied by one index per tensor."""
        cap = [c if s.rings else c + self.reserve for c, s in zip(self.cap, self.spec_of)]
        start = _starts(cap)
        src = [self.start[r] + i for r, s in enumerate(self.spec_of) for i in range(s.n)]
        dst = [start[r] + i for r, s in enumerate(self.spec_of) for i in range(s.n)]
        dev = self.keys.device
        src_t, dst_t = torch.tensor(src, device=dev), torch.tensor(dst, device=dev)
        S = start[-1] + cap[-1]

        def move(t, fill):
            new = t.new_full((S, *t.shape[1:]), fill)
            return new.index_copy_(0, dst_t, t.index_select(0, src_t))

        self.keys, self.values, self.pos = move(self.keys, 0.0), move(self.values, 0.0), move(self.pos, -1)
        self.cap, self.start = cap, start

    # ---- decode
    def append(self, k: torch.Tensor, v: torch.Tensor, position: int) -> None:
        """Write one decoded token: k (R, 1, D), v (R, 1, D_v) (views of (B, H_kv, 1, D)) at ``position``."""
        if self.step == len(self.max_k):
            self._advance()
        if position != self.position + self.step:
            raise ValueError(f"packed rows expect the token at position {self.position + self.step}, got {position=}")
        slot = self.slots[self.step]  # (R,) a view: picked by a host int, no device op
        self.keys.index_copy_(0, slot, k)
        self.values.index_copy_(0, slot, v)
        self.current = self.step
        self.step += 1

    def attend(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of q (R * rep, 1, D) over each row's entries after this step's write: (R * rep, 1, D_v)."""
        rep = q.shape[0] // self.n_rows
        if rep != self.rep:
            self.rep = rep
            self._cu_q()
        i = self.current
        if i < 0:
            raise ValueError("packed rows attend after a decoded token was written (append first)")
        return segment_attention(q, self.keys, self.values, self.cu_q, self.cu_k[i], rep, self.max_k[i], scaling)

    # ---- back to groups, accounting
    def lengths(self) -> list[int]:
        """Entries per row now (host ints)."""
        return [s.n if s.rings else s.n + self.step for s in self.spec_of]

    def to_groups(self, reserve: int):
        """The rows as :class:`attnlab.kv.cache.Group` s again (same entries, same slot order): for T_q > 1."""
        from .cache import Group

        self._fold()  # the tables are not used again
        dev = self.keys.device
        groups = []
        for s in self.specs:
            rows = torch.tensor(s.rows, device=dev)
            idx = (torch.tensor([self.start[r] for r in s.rows], device=dev).view(-1, 1)
                   + torch.arange(s.n, device=dev))  # (G, n)
            k = self.keys.index_select(0, idx.reshape(-1)).view(len(s.rows), s.n, -1)
            v = self.values.index_select(0, idx.reshape(-1)).view(len(s.rows), s.n, -1)
            pos = self.pos.index_select(0, idx.reshape(-1)).view(len(s.rows), s.n)
            g = Group(rows, k, v, pos, None, None, s.n, fixed_size=s.fixed_size, evicted=s.evicted, ring=s.ring)
            if not s.fixed_size and reserve:
                g.grow(reserve)
            g.keys, g.values = g.keys.contiguous(), g.values.contiguous()
            groups.append(g)
        return groups

    def kept_bytes(self) -> int:
        per = self.keys.shape[-1] * self.keys.element_size() + self.values.shape[-1] * self.values.element_size()
        return sum(self.lengths()) * per

    def allocated_bytes(self) -> int:
        tensors = (self.keys, self.values, self.pos, self.slots, self.cu_k)
        return sum(t.numel() * t.element_size() for t in tensors)


def _starts(cap: list[int]) -> list[int]:
    out, total = [], 0
    for c in cap:
        out.append(total)
        total += c
    return out


def _rings(g, policy, position: int) -> bool:
    """Whether a decoded token overwrites a host-known slot of ``g`` (a fixed-size ring) or is appended."""
    if not g.fixed_size or policy is None:
        return False
    slot = policy.evict(RingState(g.n, g.evicted, g.ring), position)
    if slot is None:
        return False
    if not isinstance(slot, int):
        raise NotPackable(f"{type(policy).__name__}.evict gives device slots")
    return True


def _ring_slot(s: GroupSpec, policy, step: int, position: int) -> int:
    slot = policy.evict(RingState(s.n, s.evicted + step, s.ring), position)
    if not isinstance(slot, int):
        raise NotPackable(f"{type(policy).__name__}.evict gives device slots")
    return slot


class NotPackable(ValueError):
    """A layer whose rows cannot be packed (the caller keeps its groups)."""


def packable(groups, policy) -> bool:
    """Whether ``groups`` (a layer's groups after compression) can be packed: several groups, none with log
    weights or tracked scores, rings whose slot the policy gives as a host int."""
    if len(groups) < 2 or any(g.log_weight is not None or g.score is not None for g in groups):
        return False
    if any(g.fixed_size and not g.ring for g in groups):
        return False
    return True


def pack(groups, n_rows: int, policy, position: int, reserve: int) -> PackedRows | None:
    """:class:`PackedRows` of a layer's groups, or None when they cannot be packed (see :func:`packable`)."""
    if not packable(groups, policy):
        return None
    try:
        return PackedRows(groups, n_rows, None, policy, position, reserve)
    except NotPackable:
        return None

