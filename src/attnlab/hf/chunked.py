"""The exact chunked attention that attnlab runs when observers or score/prob modifiers are attached.

Queries are processed ``chunk`` rows at a time, so one layer never holds more than a
(B, H, chunk, T_kv) float32 score block: memory is O(chunk x T_kv), whatever T_q is.
For each chunk: scores = q k^T * scaling (+ bias, softcap) -> ``modify_scores`` -> mask ->
softmax (fully masked rows -> 0) -> ``modify_probs`` -> every ``observe`` -> probs @ v.

Keys that no query of a chunk may see (the causal future, padding at the edges) are skipped in the
matmuls and the softmax. Observers get full-width rows, with exact zeros there, unless they set
``narrow_ok`` (then, when the skipped keys are all at the end, they get only the first keys).
On the plain causal path the chunk's logits and each row's log-sum-exp are offered to observers
through ``ctx.chunk_logits`` / ``ctx.chunk_log_norm`` (see :class:`attnlab.probes.base.CallContext`).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..interventions.base import Modifier
from ..probes.base import CallContext, Observer


def chunked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ctx: CallContext,
    *,
    allowed: torch.Tensor | None = None,
    causal_offset: int | None = None,
    bias: torch.Tensor | None = None,
    scaling: float,
    softcap: float | None = None,
    dropout: float = 0.0,
    observers: Sequence[Observer] = (),
    modifiers: Sequence[Modifier] = (),
    chunk: int = 256,
) -> torch.Tensor:
    """Exact attention in float32, query chunk by query chunk, showing each chunk to observers.

    Args:
        query: (B, H, T_q, D). key: (B, H_kv, T_kv, D). value: (B, H_kv, T_kv, D_v); H % H_kv == 0 and
            query head h reads kv head h // (H / H_kv), as transformers' ``repeat_kv`` does.
        ctx: the call's context, handed to observers and modifiers.
        allowed: bool, broadcastable to (B, H, T_q, T_kv), True where a query may see a key.
        causal_offset: query i may see key j iff j <= i + causal_offset (T_kv - T_q: bottom-right
            aligned; 0: upper-left). Combined with ``allowed`` when both are given.
        bias: float additive logit bias broadcastable to (B, H, T_q, T_kv), or None.
        scaling: multiplies q k^T. softcap: if set, scores = softcap * tanh(scores / softcap).
        dropout: dropout on the probabilities used for the output (observers see them undropped).

    Returns:
        (B, H, T_q, D_v) float32, before ``modify_output`` (the caller applies it).
    """
    b, h, n_q, d = query.shape
    h_kv, n_kv, d_v = key.shape[1], key.shape[2], value.shape[-1]
    g = h // h_kv
    # Query heads grouped per kv head and folded into rows: K and V are read once per group,
    # never copied (B, H_kv, G, T_q, D).
    q = query.float().reshape(b, h_kv, g, n_q, d)
    k_t = key.float().transpose(-1, -2)  # (B, H_kv, D, T_kv)
    v = value.float()  # (B, H_kv, T_kv, D_v)
    scores_mods = [m for m in modifiers if _overrides(m, "modify_scores")]
    prob_mods = [m for m in modifiers if _overrides(m, "modify_probs")]
    full_width = bool(scores_mods)  # modify_scores is promised all T_kv columns
    out = torch.zeros(b, h, n_q, d_v, dtype=torch.float32, device=query.device)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    # Chunk tensors may be reused buffers only when nobody can keep them: no modifiers, no autograd,
    # and observers that promised (narrow_ok) to read each chunk only during ``observe``.
    reuse = not modifiers and not grad and all(o.narrow_ok for o in observers)
    for q0 in range(0, n_q, chunk):
        q1 = min(q0 + chunk, n_q)
        c = q1 - q0
        rows_allowed = None if allowed is None else _rows(allowed, q0, q1)
        k0, k1 = (0, n_kv) if full_width else _key_window(rows_allowed, causal_offset, q1, n_kv)
        if k1 <= k0:  # nothing visible to any row of this chunk: all-zero rows, zero output
            probs_full = torch.zeros(b, h, c, n_kv, device=query.device)
            for o in observers:
                o.observe(ctx, q0, probs_full)
            continue
        qc = q[:, :, :, q0:q1].reshape(b, h_kv, g * c, d)
        # baddbmm folds the scaling into the matmul (no extra pass over the scores).
        # Reused buffers: a fresh multi-MB tensor per chunk costs page faults comparable to the math.
        n_el = b * h * c * (k1 - k0)
        scores = torch.baddbmm(
            qc.new_empty(()).expand(b * h_kv, g * c, k1 - k0), qc.reshape(b * h_kv, g * c, d),
            k_t[..., k0:k1].reshape(b * h_kv, d, k1 - k0), beta=0.0, alpha=scaling,
            out=_buffer(0, n_el, query.device).view(b * h_kv, g * c, k1 - k0) if reuse else None,
        ).view(b, h, c, k1 - k0)  # (B, H, C, W)
        if bias is not None:
            scores.add_(_rows(bias, q0, q1)[..., k0:k1].float())
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        for m in scores_mods:
            scores = m.modify_scores(ctx, q0, scores)
        # Masking after modify_scores: a modifier can never make a masked key visible.
        maybe_empty_rows = bool(scores_mods)
        # Fast path (no grad, no modifiers, every row of the chunk sees key 0 at least): the causal
        # future is filled with a finite floor, not -inf, so the shifted logits stay finite and the
        # observers can be offered them (entropy as a dot product instead of a log pass).
        fast = (
            not scores_mods and not prob_mods and rows_allowed is None and causal_offset is not None
            and q0 + causal_offset >= 0 and k0 == 0 and not (torch.is_grad_enabled() and scores.requires_grad)
        )
        if causal_offset is not None:
            _mask_causal_(scores, q0, q1, k0, causal_offset, _FLOOR if fast else float("-inf"))
        if rows_allowed is not None:
            window = rows_allowed[..., k0:k1]
            scores.masked_fill_(~window, float("-inf"))
            # with a causal rule on top, a row's only allowed keys may lie in its future
            maybe_empty_rows = maybe_empty_rows or causal_offset is not None or not bool(window.any(-1).all())
        if fast:
            # One fused softmax (each row stays in cache while it is normalised); the scores are kept,
            # so observers get log p = scores - lse without a log pass over the chunk.
            probs = torch.softmax(scores, dim=-1, out=_buffer(1, n_el, query.device).view_as(scores) if reuse else None)
            ctx.chunk_logits, ctx.chunk_log_norm = scores, _row_lse(scores, probs, q0, causal_offset)
        else:
            probs = torch.softmax(scores, dim=-1)
        if maybe_empty_rows:  # a row with no visible key is NaN after softmax; attnlab defines it as 0
            # out of place under autograd: softmax's backward needs its own output intact
            probs = probs.nan_to_num(nan=0.0) if probs.requires_grad else probs.nan_to_num_(nan=0.0)
        if prob_mods or observers:
            narrow = k0 == 0 and not prob_mods
            probs_full = probs if narrow and all(o.narrow_ok for o in observers) else _widen(probs, k0, k1, n_kv)
            for m in prob_mods:
                probs_full = m.modify_probs(ctx, q0, probs_full)
            for o in observers:
                o.observe(ctx, q0, probs if narrow and o.narrow_ok else probs_full)
            if prob_mods:  # a modifier may have moved mass anywhere
                probs, k0, k1 = probs_full, 0, n_kv
        ctx.chunk_logits = ctx.chunk_log_norm = None
        if dropout > 0.0:
            probs = torch.nn.functional.dropout(probs, p=dropout)
        out_c = probs.reshape(b, h_kv, g * c, k1 - k0) @ v[:, :, k0:k1]  # (B, H_kv, G*C, D_v)
        out[:, :, q0:q1] = out_c.view(b, h, c, d_v)
    return out


def _key_window(rows_allowed: torch.Tensor | None, causal_offset: int | None, q1: int, n_kv: int) -> tuple[int, int]:
    """[k0, k1): the smallest key range outside which no query of the chunk sees anything."""
    k0, k1 = 0, n_kv
    if causal_offset is not None:
        k1 = max(0, min(n_kv, q1 + causal_offset))  # the chunk's last row sees up to q1 - 1 + offset
    if rows_allowed is not None:
        cols = rows_allowed.reshape(-1, rows_allowed.shape[-1]).any(0)[:k1]
        nz = cols.nonzero()
        if nz.numel() == 0:
            return 0, 0
        k0, k1 = int(nz[0]), int(nz[-1]) + 1
    return k0, k1


# Masked logits on the fast path: exp(_FLOOR - max) is exactly 0, and 0 * _FLOOR is 0, not NaN.
_FLOOR = -1e30


_BUFFERS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _buffer(slot: int, n: int, device: torch.device) -> torch.Tensor:
    """A flat float32 scratch tensor of >= n elements, kept between calls (slot 0: scores, 1: probs)."""
    key = (slot, torch.device(device))
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < n:
        buf = _BUFFERS[key] = torch.empty(n, dtype=torch.float32, device=device)
    return buf[:n]


def clear_buffers() -> None:
    """Free the scratch buffers that the exact path keeps between calls."""
    _BUFFERS.clear()
    _TRIANGLES.clear()


def _row_lse(scores: torch.Tensor, probs: torch.Tensor, q0: int, offset: int) -> torch.Tensor:
    """(B, H, C) log-sum-exp of each row of a causal chunk, read off one visible key: lse = s_j - log p_j.

    Exact up to float32 rounding for any key j whose p_j is a normal float, so each row uses the larger
    of key 0 and its own key (both visible on the fast path; one is the first-token sink in most heads).
    Rows where both are below 1e-30 (never seen on SmolLM2) take a full logsumexp instead.
    """
    b, h, c, _ = scores.shape
    own = (torch.arange(q0, q0 + c, device=scores.device) + offset).view(1, 1, c, 1).expand(b, h, c, 1)
    p_own, p_first = probs.gather(-1, own), probs[..., :1]
    first = p_first >= p_own
    p_ref = torch.where(first, p_first, p_own)
    lse = torch.where(first, scores[..., :1], scores.gather(-1, own)) - p_ref.log()
    weak = p_ref < 1e-30
    if bool(weak.any()):
        lse = torch.where(weak, scores.logsumexp(-1, keepdim=True), lse)
    return lse.squeeze(-1)


def _mask_causal_(scores: torch.Tensor, q0: int, q1: int, k0: int, offset: int, fill: float = float("-inf")) -> None:
    """In place: ``fill`` where key j > query i + offset, for a (B, H, C, W) block starting at key k0."""
    w = scores.shape[-1]
    first = max(q0 + offset + 1 - k0, 0)  # the first column some row of the chunk cannot see
    if first >= w:
        return
    if fill == _FLOOR:
        # adding a cached (C, W - first) 0 / floor triangle is ~3x faster than masked_fill_ with a
        # broadcast mask, and exact: s + 0 = s, and s + _FLOOR rounds to _FLOOR for any |s| < 1e22
        scores[..., first:].add_(_floor_triangle(q0 + offset - k0 - first, q1 - q0, w - first, scores.device))
        return
    rows = torch.arange(q0, q1, device=scores.device)[:, None] + offset
    cols = torch.arange(k0 + first, k0 + w, device=scores.device)[None, :]
    scores[..., first:].masked_fill_(cols > rows, fill)


_TRIANGLES: dict[tuple, torch.Tensor] = {}


def _floor_triangle(shift: int, c: int, w: int, device: torch.device) -> torch.Tensor:
    """(C, W) float32: _FLOOR where column j > row i + shift, else 0 (kept; chunks repeat the same few shapes)."""
    key = (shift, c, w, torch.device(device))
    tri = _TRIANGLES.get(key)
    if tri is None:
        if len(_TRIANGLES) > 64:
            _TRIANGLES.clear()
        visible = torch.arange(w, device=device)[None, :] <= torch.arange(c, device=device)[:, None] + shift
        tri = _TRIANGLES[key] = torch.zeros(c, w, device=device).masked_fill_(~visible, _FLOOR)
    return tri


def _widen(probs: torch.Tensor, k0: int, k1: int, n_kv: int) -> torch.Tensor:
    """(B, H, C, k1 - k0) -> (B, H, C, T_kv) with exact zeros outside [k0, k1)."""
    if k0 == 0 and k1 == n_kv:
        return probs
    # pad writes each element once (zeros + copy would write the window twice)
    return torch.nn.functional.pad(probs, (k0, n_kv - k1))


def _rows(t: torch.Tensor, q0: int, q1: int) -> torch.Tensor:
    """Query rows q0:q1 of a (..., T_q or 1, T_kv) tensor, keeping a broadcast row dim as is."""
    return t if t.shape[-2] == 1 else t[..., q0:q1, :]


def _overrides(obj, method: str) -> bool:
    return getattr(type(obj), method) is not getattr(Modifier, method)
