"""A ragged per-head KV cache for transformers' Cache API: each (sample, KV head) keeps its own entries.

After prefill a :class:`attnlab.kv.base.Policy` chooses, per layer, per sample and per KV head
(GQA: one choice per KV head, serving its whole query group), which prompt positions to keep. The
cache stores only those entries, for real: rows (one row = one sample's KV head) that keep the same
number of entries share one buffer, a :class:`Group` ``(G, C, D)``, so the bytes saved are bytes not
allocated. Decoded tokens are appended to every row (or, for fixed-size policies, overwrite the slot
the policy evicts: in place, at a slot known on the host for rings such as StreamingLLM's). Attention
over the cache runs one SDPA call per group on a contiguous slice of the rows (permuted once per layer
and step when groups interleave), so a uniform policy costs one call per layer, like a plain cache.
On CUDA a layer with several groups is packed instead (:mod:`attnlab.kv.packed`): all its rows in one
flat buffer, one variable-length attention call and three writes per decode step (``packed=``).

Decode speed: on a small model a GPU decode step is launch-bound, so a step must launch few ops and
never wait for the device (no ``.item()``, no Python number written through an index tensor);
``attnlab.kv.session.OpCounter`` counts both, tests/kv/test_decode_ops.py keeps them down.

RoPE: transformers caches keys *after* the rotary embedding, so each kept key already carries its
original position; dropping entries needs no re-rotation, and entry order inside a row does not
matter to attention (slots are reused in place when fixed-size policies evict).

Padding: with left padding (as ``generate`` uses for batches), padding positions are never stored;
each sample's rows hold only its real tokens, so decode attention needs no mask at all.

The cache only works with the attention function that :func:`attnlab.kv.session.apply` installs:
``update`` returns the layer's new keys/values, not the (ragged) cache contents.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from .base import Keep, Policy, PrefillView
from .packed import PackedRows, kernel_ok, pack

RESERVE = 64  # default decode slots allocated after prefill; a group grows by RESERVE when full


@dataclass
class Group:
    """Rows of one layer that keep the same number of entries, stored in one buffer.

    Attributes:
        rows: (G,) long, indices into the flattened (B * H_kv) rows: row = b * H_kv + kv_head.
        keys: (G, C, D) buffer; values: (G, C, D_v); C >= n is the capacity.
        pos: (G, C) long, the token position each slot holds (-1: a synthetic entry).
        log_weight: (G, C) float32 added to each slot's logit, or None when all zero.
        score: (G, C) float32 attention mass accumulated per slot (H2O), or None.
        n: slots in use.
        fixed_size: decoding keeps ``n`` constant (the policy evicts), else it appends.
        n_new: entries appended since the last attention call (causal mask for T_q > 1).
        evicted: decoded tokens that overwrote a slot so far.
        ring: every row's slots hold ascending positions rotated only by evictions, i.e. the
            prompt's kept entries in order (compression stores them so) and, once ``evicted`` > 0,
            no append since the first eviction. Then "oldest non-sink entry" is a slot number known
            on the host (sinks + evicted mod window, see ``Streaming.evict``): no device work to find it.
    """

    rows: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    pos: torch.Tensor
    log_weight: torch.Tensor | None
    score: torch.Tensor | None
    n: int
    fixed_size: bool = False
    n_new: int = 0
    evicted: int = 0
    ring: bool = True

    @property
    def size(self) -> int:
        return self.rows.shape[0]

    def kept_keys(self) -> torch.Tensor:
        """(G, n, D) view of the stored keys."""
        return self.keys[:, : self.n]

    def kept_values(self) -> torch.Tensor:
        return self.values[:, : self.n]

    def kept_bytes(self) -> int:
        return self.size * self.n * (self.keys.shape[-1] * self.keys.element_size()
                                     + self.values.shape[-1] * self.values.element_size())

    def allocated_bytes(self) -> int:
        extra = [t for t in (self.pos, self.log_weight, self.score) if t is not None]
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, *extra))

    def grow(self, extra: int) -> None:
        """Add ``extra`` slots of capacity (one copy; amortised by growing in RESERVE steps)."""
        def pad(t, fill):
            if t is None:
                return None
            more = t.new_full((t.shape[0], extra, *t.shape[2:]), fill)
            return torch.cat([t, more], dim=1)

        self.keys, self.values = pad(self.keys, 0.0), pad(self.values, 0.0)
        self.pos = pad(self.pos, -1)
        self.log_weight, self.score = pad(self.log_weight, 0.0), pad(self.score, 0.0)


class RaggedLayer(CacheLayerMixin):
    """One layer's ragged cache. Before compression it holds the prefill's keys/values (``pending``)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, policy: Policy | None, layer: int, n_layers: int, reserve: int = RESERVE,
                 score_kinds: frozenset[str] = frozenset(), packed: bool | None = None):
        super().__init__()
        self.packed_mode = packed  # None: pack multi-group layers on CUDA only (the group path is faster on CPU)
        self.packed: PackedRows | None = None
        self.policy = policy
        self.layer, self.n_layers = layer, n_layers
        self.reserve = reserve
        self.score_kinds = score_kinds  # scores to compute at prefill (a recording may want several)
        self.groups: list[Group] = []
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, H_kv, T, D) prefill keys/values
        self.valid: torch.Tensor | None = None  # (B, T) bool, real (non-padding) prompt tokens
        self.scores: dict[str, torch.Tensor] = {}  # kind -> (B, H_kv, T) float32
        self.n_seen = 0  # tokens this layer has seen, padding included (the logical sequence length)
        self.n_decoded = 0
        self.batch = self.n_kv = 0
        self._n_real = 0  # real (non-padding) prompt tokens over the batch, set at prefill
        self._entry_bytes = 0  # bytes of one key + value entry, set at compression
        self.perm: torch.Tensor | None = None  # see _layout
        self.inverse: torch.Tensor | None = None
        self.spans: list[tuple[int, int]] = []

    # ---- transformers' CacheLayerMixin
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.batch, self.n_kv = key_states.shape[:2]
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new (B, H_kv, T, D) keys/values; returns them (attention reads the groups)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[2]
        self.n_seen += t
        if not self.groups and self.packed is None and self.pending is None:
            self.pending = (key_states, value_states)
            return self.pending
        if self.pending is not None:  # a second prefill chunk before compression: extend it
            self.pending = (torch.cat([self.pending[0], key_states], 2), torch.cat([self.pending[1], value_states], 2))
            return self.pending
        self.append(key_states, value_states, self.n_seen - t)
        self.n_decoded += t
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n_seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.n_seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.groups, self.pending, self.valid, self.scores = [], None, None, {}
        self.packed = None
        self.perm = self.inverse = None
        self.spans = []
        self.n_seen = self.n_decoded = self._n_real = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("RaggedCache does not support beam search (reorder_cache)")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("RaggedCache cannot crop: dropped entries are gone")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("RaggedCache does not support num_return_sequences > 1 or beam search")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("RaggedCache does not support selecting batch rows")

    # ---- compression
    def compress(self, policy: Policy | None = None) -> None:
        """Replace the pending prefill keys/values by what ``policy`` keeps (default: the layer's)."""
        policy = policy or self.policy
        keys, values = self.pending
        B, H, T, _ = keys.shape
        valid = self.valid if self.valid is not None else torch.ones(B, T, dtype=torch.bool, device=keys.device)
        parts: dict[tuple, list] = {}
        for b in range(B):
            idx = valid[b].nonzero().squeeze(1)  # (T_b,) real positions of sample b
            dense = bool(idx.numel() == T)
            kb, vb = (keys[b], values[b]) if dense else (keys[b][:, idx], values[b][:, idx])
            sc = self.scores.get(policy.scores) if policy.scores else None
            if sc is not None:
                sc = sc[b] if dense else sc[b][:, idx]
            view = PrefillView(self.layer, self.n_layers, kb, vb, sc)
            for keep in policy.select(view):
                part = _gather(keep, kb, vb, idx, b * H)
                key = (part[1].shape[1], part[4] is not None, keep.fixed_size)
                parts.setdefault(key, []).append(part)
        groups = [self._group(ps, fixed, policy.tracks_scores) for (_, _, fixed), ps in parts.items()]
        self.groups = sorted(groups, key=lambda g: int(g.rows[0]))
        g = self.groups[0]
        self._entry_bytes = g.keys.shape[-1] * g.keys.element_size() + g.values.shape[-1] * g.values.element_size()
        self._layout()
        self.pending, self.scores = None, {}
        self._pack(policy)

    def _pack(self, policy: Policy | None) -> None:
        """Pack a multi-group layer's rows for one attention call per step (see :mod:`attnlab.kv.packed`)."""
        mode, g = self.packed_mode, self.groups[0]
        if mode is False or len(self.groups) < 2:
            return
        if mode is None and g.keys.device.type != "cuda":
            return
        if g.keys.device.type == "cuda" and not kernel_ok(g.keys.device, g.keys.dtype):
            return
        self.packed = pack(self.groups, self.batch * self.n_kv, policy, self.n_seen, self.reserve)
        if self.packed is not None:
            self.groups, self.perm, self.inverse, self.spans = [], None, None, []

    def _unpack(self) -> None:
        """Back to groups (a multi-token step): the same entries in the same slots."""
        self.groups = self.packed.to_groups(self.reserve)
        self.packed = None
        self._layout()

    @property
    def n_groups(self) -> int:
        """Groups of rows of different sizes (a packed layer counts the groups it was made of)."""
        return len(self.packed.specs) if self.packed is not None else len(self.groups)

    def _layout(self) -> None:
        """Row order of the groups, once per compression, so decoding needs no per-group gathers.

        Rows taken group after group (``perm``) make each group a contiguous slice ``spans[i]``: new
        keys/values and queries are permuted once per layer and step (not gathered once per group),
        and the outputs are concatenated and put back in one more gather. ``perm`` is None when the
        groups' rows are already in order (one group; or e.g. heads {0} and {1, 2} at batch 1).
        """
        rows = torch.cat([g.rows for g in self.groups])
        ends = torch.tensor([g.size for g in self.groups]).cumsum(0).tolist()
        self.spans = list(zip([0] + ends[:-1], ends))
        if torch.equal(rows.cpu(), torch.arange(rows.numel())):
            self.perm = self.inverse = None
        else:
            self.perm, self.inverse = rows, rows.argsort()

    def _group(self, parts: list, fixed: bool, tracks: bool) -> Group:
        rows, k, v, pos, logw = (torch.cat(x, 0) if x[0] is not None else None for x in zip(*parts))
        order = rows.argsort()  # rows ascending: the single-group case is then the identity
        rows, k, v, pos = rows[order], k[order], v[order], pos[order]
        logw = logw[order] if logw is not None else None
        n = k.shape[1]
        g = Group(rows, k, v, pos, logw, torch.zeros(pos.shape, dtype=torch.float32, device=k.device) if tracks else None,
                  n, fixed_size=fixed)
        if not fixed and self.reserve:
            g.grow(self.reserve)
        g.keys, g.values = g.keys.contiguous(), g.values.contiguous()
        return g

    # ---- decode
    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, position: int) -> None:
        """Add (B, H_kv, T_q, D) new entries at ``position``... to every row; full fixed-size groups evict.

        A decode step costs a few device ops per group and no host-device synchronisation: slices
        and in-place copies/fills with host-side scalars (never a Python number written through an
        index tensor, which on CUDA copies the number to the device and waits).
        """
        t = key_states.shape[2]
        if self.packed is not None and t > 1:
            self._unpack()
        if self.packed is not None:  # (R, 1, D) views: rows are in natural order
            self.packed.append(key_states.reshape(-1, 1, key_states.shape[-1]),
                               value_states.reshape(-1, 1, value_states.shape[-1]), position)
            return
        k = key_states.reshape(self.batch * self.n_kv, t, key_states.shape[-1])
        v = value_states.reshape(self.batch * self.n_kv, t, value_states.shape[-1])
        if self.perm is not None:
            k, v = k.index_select(0, self.perm), v.index_select(0, self.perm)
        for g, (s, e) in zip(self.groups, self.spans):
            kg, vg = k[s:e], v[s:e]
            slot = None
            if g.fixed_size and t == 1 and self.policy is not None:
                slot = self.policy.evict(g, position)
            if slot is not None:
                _overwrite(g, slot, kg, vg, position)
                continue
            if g.fixed_size and g.evicted:
                g.ring = False  # appended after evicting: slots no longer rotate as a ring
            if g.n + t > g.keys.shape[1]:
                g.grow(max(self.reserve, t, 1))
            g.keys[:, g.n: g.n + t].copy_(kg)
            g.values[:, g.n: g.n + t].copy_(vg)
            if t == 1:
                g.pos[:, g.n].fill_(position)
            else:
                g.pos[:, g.n: g.n + t].copy_(torch.arange(position, position + t, device=g.pos.device))
            g.n += t
            g.n_new = t

    def attend(self, query: torch.Tensor, scaling: float, module=None) -> torch.Tensor:
        """Attention of (B, H, T_q, D) queries over the kept entries; returns (B, T_q, H, D_v).

        The T_q queries are the latest T_q entries of each row (appended in order): they see every
        older entry and each other causally.
        """
        B, Hq, Tq, D = query.shape
        rep = Hq // self.n_kv
        R = self.batch * self.n_kv
        if self.packed is not None and Tq == 1:  # one call for every row; (R * rep, 1, D) is a view
            out = self.packed.attend(query.reshape(R * rep, 1, D), scaling)
            return out.view(B, Hq, 1, -1).transpose(1, 2)
        if self.packed is not None:
            self._unpack()  # T_q > 1 without an append first (not reached through update)
        if len(self.groups) == 1 and Tq == 1 and _plain(self.groups[0], R) and module is not None:
            return _sdpa_plain(module, query, self.groups[0], B, self.n_kv, scaling)
        q = query.reshape(R, rep, Tq, D)
        if self.perm is not None:
            q = q.index_select(0, self.perm)
        outs = []
        for g, (s, e) in zip(self.groups, self.spans):
            outs.append(_group_attention(g, q[s:e], scaling, Tq))
            g.n_new = 0
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
        if self.inverse is not None:
            out = out.index_select(0, self.inverse)
        return out.view(B, Hq, Tq, -1).transpose(1, 2)

    # ---- accounting
    def kept_bytes(self) -> int:
        """Bytes of the key/value entries kept (what the cache is for)."""
        packed = self.packed.kept_bytes() if self.packed is not None else 0
        return packed + sum(g.kept_bytes() for g in self.groups)

    def allocated_bytes(self) -> int:
        """Bytes of every tensor the layer holds: buffers with spare capacity and slot metadata too."""
        pend = sum(t.numel() * t.element_size() for t in self.pending) if self.pending is not None else 0
        packed = self.packed.allocated_bytes() if self.packed is not None else 0
        return pend + packed + sum(g.allocated_bytes() for g in self.groups)

    def full_bytes(self) -> int:
        """Bytes a plain cache would hold for the same real tokens (padding excluded)."""
        if self.pending is not None or (not self.groups and self.packed is None):
            if self.pending is None:
                return 0
            k, v = self.pending
            per = k.shape[1] * (k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size())
            n_real = int(self.valid.sum()) if self.valid is not None else k.shape[0] * k.shape[2]
            return per * n_real
        per = self.n_kv * self._entry_bytes
        return per * (self.n_real + self.batch * self.n_decoded)

    @property
    def n_real(self) -> int:
        """Real prompt tokens over the batch (set at prefill)."""
        return self._n_real

    def set_valid(self, valid: torch.Tensor | None, batch: int, length: int) -> None:
        self.valid = valid
        self._n_real = int(valid.sum()) if valid is not None else batch * length


def _gather(keep: Keep, kb: torch.Tensor, vb: torch.Tensor, idx: torch.Tensor, row0: int):
    """(rows, keys, values, pos, log_weight) of one Keep of one sample; pos in the padded sequence."""
    heads = keep.heads.to(kb.device)
    index = keep.index.to(kb.device)
    k = torch.gather(kb[heads], 1, index.unsqueeze(-1).expand(-1, -1, kb.shape[-1]))  # (G, L, D)
    v = torch.gather(vb[heads], 1, index.unsqueeze(-1).expand(-1, -1, vb.shape[-1]))
    pos = idx[index]  # (G, L)
    logw = None
    if keep.extra_keys is not None:
        e = keep.extra_keys.shape[1]
        k = torch.cat([k, keep.extra_keys.to(k.dtype)], 1)
        v = torch.cat([v, keep.extra_values.to(v.dtype)], 1)
        pos = torch.cat([pos, pos.new_full((pos.shape[0], e), -1)], 1)
        w = keep.extra_log_weight if keep.extra_log_weight is not None else torch.zeros(heads.shape[0], e)
        logw = torch.cat([torch.zeros(index.shape, dtype=torch.float32, device=k.device),
                          w.to(device=k.device, dtype=torch.float32)], 1)
    return row0 + heads, k, v, pos, logw


def _overwrite(g: Group, slot: int | torch.Tensor, kg: torch.Tensor, vg: torch.Tensor, position: int) -> None:
    """Put the new (G, 1, D) entries of a full fixed-size group in ``slot``: an int shared by every row
    (one in-place copy per tensor) or a (G,) tensor (one scatter per tensor, no index built)."""
    if isinstance(slot, int):
        g.keys[:, slot].copy_(kg[:, 0])
        g.values[:, slot].copy_(vg[:, 0])
        g.pos[:, slot].fill_(position)
        for t in (g.log_weight, g.score):
            if t is not None:
                t[:, slot].zero_()
    else:
        idx = slot.view(-1, 1)
        g.keys.scatter_(1, idx.view(-1, 1, 1).expand(-1, 1, g.keys.shape[-1]), kg)
        g.values.scatter_(1, idx.view(-1, 1, 1).expand(-1, 1, g.values.shape[-1]), vg)
        g.pos.scatter_(1, idx, position)
        for t in (g.log_weight, g.score):
            if t is not None:
                t.scatter_(1, idx, 0.0)
    g.evicted += 1
    g.n_new = 0


def _plain(g: Group, n_rows: int) -> bool:
    return g.size == n_rows and g.log_weight is None and g.score is None


def _sdpa_plain(module, query, g: Group, B: int, H_kv: int, scaling: float) -> torch.Tensor:
    """One group holding every row in order: transformers' own SDPA call, as a plain cache would make."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    k = g.kept_keys().view(B, H_kv, g.n, -1)
    v = g.kept_values().view(B, H_kv, g.n, -1)
    out, _ = sdpa_attention_forward(module, query, k, v, None, dropout=0.0, scaling=scaling)
    g.n_new = 0
    return out


_ZEROS: dict = {}


def _zero(device) -> torch.Tensor:
    """A float32 0 on ``device`` (made once): the ignored ``input`` of a beta=0 ``baddbmm``."""
    if device not in _ZEROS:
        _ZEROS[device] = torch.zeros((), dtype=torch.float32, device=device)
    return _ZEROS[device]


_ONES: dict = {}


def _ones(G: int, m: int, device) -> torch.Tensor:
    """(G, 1, m) float32 ones on ``device`` (made once per shape): sums m query rows by a product."""
    key = (G, m, device)
    if key not in _ONES:
        _ONES[key] = torch.ones(G, 1, m, dtype=torch.float32, device=device)
    return _ONES[key]


def _group_attention(g: Group, q: torch.Tensor, scaling: float, Tq: int) -> torch.Tensor:
    """(G, rep, T_q, D_v) attention of q (G, rep, T_q, D) over the group's n entries.

    The rep query heads that share a KV head are folded into the query axis (rows r * T_q + t), so
    one (G, rep * T_q, n) product serves them all: expanding the keys per query head instead makes
    matmul copy them at every step.
    """
    G, rep, _, D = q.shape
    n = g.n
    k = g.kept_keys()  # (G, n, D)
    v = g.kept_values()
    qf = q.reshape(G, rep * Tq, D)
    bias = None  # broadcasts to (G, rep * T_q, n)
    if g.log_weight is not None:
        bias = g.log_weight[:, :n].view(G, 1, n)
    if Tq > 1:  # the newest Tq entries are the queries themselves: causal among them
        new = g.n_new if g.n_new >= Tq else Tq
        i = torch.arange(Tq, device=q.device).view(Tq, 1)
        j = torch.arange(n, device=q.device).view(1, n)
        allowed = (j < n - new) | (j - (n - new) <= i + (new - Tq))
        causal = torch.zeros(Tq, n, dtype=torch.float32, device=q.device).masked_fill(~allowed, -math.inf)
        causal = causal.repeat(rep, 1).view(1, rep * Tq, n)
        bias = causal if bias is None else bias + causal
    if g.score is not None:  # H2O needs the probabilities: logits (bias and scale fused), softmax, two products
        base = bias if bias is not None else _zero(q.device)
        logits = torch.baddbmm(base, qf.float(), k.float().transpose(1, 2), beta=1.0 if bias is not None else 0.0,
                               alpha=scaling)  # (G, rep * Tq, n)
        p = torch.softmax(logits, dim=-1)
        # the mass each slot received, summed over the rep * Tq queries: one in-place product (score += 1 @ p)
        g.score[:, :n].unsqueeze(1).baddbmm_(_ones(G, rep * Tq, q.device), p)
        out = torch.bmm(p.to(v.dtype), v).to(q.dtype)
    else:
        mask = bias.to(q.dtype).unsqueeze(1) if bias is not None else None
        out = F.scaled_dot_product_attention(qf.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), attn_mask=mask,
                                             scale=scaling).squeeze(1)
    return out.view(G, rep, Tq, -1)


class RaggedCache(Cache):
    """transformers ``Cache`` of :class:`RaggedLayer` s, one per decoder layer.

    Args:
        policy: the :class:`attnlab.kv.base.Policy` applied after prefill (None: record only, see
            :meth:`compressed`).
        n_layers: number of decoder layers.
        reserve: decode slots allocated per row after prefill (more are added when needed).
        score_kinds: prefill scores to compute and keep (default: what the policy asks for).
        packed: True: layers with several groups are packed for one attention call per step
            (:mod:`attnlab.kv.packed`; on CPU through an exact loop, for tests); False: never;
            None (default): on CUDA only, where the varlen kernels pass their check.
    """

    def __init__(self, policy: Policy | None, n_layers: int, *, reserve: int = RESERVE,
                 score_kinds: frozenset[str] | None = None, packed: bool | None = None):
        if score_kinds is None:
            score_kinds = frozenset({policy.scores}) if policy is not None and policy.scores else frozenset()
        layers = [RaggedLayer(policy, i, n_layers, reserve, score_kinds, packed) for i in range(n_layers)]
        super().__init__(layers=layers)
        self.policy = policy
        self.reserve = reserve
        self.packed = packed

    def set_packed(self, packed: bool | None) -> None:
        """Choose the packing of layers compressed from now on (see ``packed`` above)."""
        self.packed = packed
        for layer in self.layers:
            layer.packed_mode = packed

    def packed_layers(self) -> int:
        """Layers currently packed."""
        return sum(layer.packed is not None for layer in self.layers)

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch if self.layers[0].is_initialized else -1

    def kept_bytes(self) -> int:
        """Bytes of the key/value entries kept, over all layers."""
        return sum(layer.kept_bytes() for layer in self.layers)

    def allocated_bytes(self) -> int:
        """Bytes of every tensor held (spare decode capacity and per-slot metadata included)."""
        return sum(layer.allocated_bytes() for layer in self.layers)

    def full_bytes(self) -> int:
        """Bytes a plain (uncompressed) cache would hold for the same real tokens."""
        return sum(layer.full_bytes() for layer in self.layers)

    def kept_fraction(self) -> float:
        full = self.full_bytes()
        return self.kept_bytes() / full if full else float("nan")

    def compressed(self, policy: Policy, *, reserve: int | None = None, packed: bool | None = None) -> "RaggedCache":
        """A new cache holding what ``policy`` keeps of this recorded (not yet compressed) prefill.

        The recording is left intact, so one prefill serves several policies; this is exact because
        compression never changes the prefill itself (every prefill query attends to all its keys).
        """
        if any(layer.pending is None for layer in self.layers):
            raise ValueError("compressed() needs a recorded prefill: a RaggedCache(policy=None) after one forward")
        if policy.scores and policy.scores not in self.layers[0].scores:
            raise ValueError(f"the recording has no {policy.scores!r} scores that {type(policy).__name__} needs; "
                             f"record with score_kinds containing {policy.scores!r}")
        out = RaggedCache(policy, len(self.layers), reserve=self.reserve if reserve is None else reserve,
                          packed=self.packed if packed is None else packed)
        for src, dst in zip(self.layers, out.layers):
            dst.lazy_initialization(*src.pending)
            dst.pending, dst.scores = src.pending, dict(src.scores)
            dst.set_valid(src.valid, src.batch, src.pending[0].shape[2])
            dst.n_seen = src.n_seen
            dst.compress()
        return out
