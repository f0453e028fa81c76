"""Helpers for the KV tests: a policy that keeps given indices, the masked float64 reference, and what a
policy kept as {kv head: positions}."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from attnlab.core import reference
from attnlab.kv import Keep, Policy, RaggedLayer


@dataclass
class GivenPolicy(Policy):
    """Keeps ``plans[b]`` (a list of Keep) for the b-th sample it is asked about (calls cycle over samples)."""

    plans: list = field(default_factory=list)
    name: ClassVar[str] = "given"
    calls: int = 0

    def select(self, view):
        plan = self.plans[self.calls % len(self.plans)]
        self.calls += 1
        return plan


def ragged_layer(keys, values, plans, *, reserve=4) -> RaggedLayer:
    """A RaggedLayer that prefilled (B, H_kv, T, D) keys/values and kept ``plans[b]`` for sample b."""
    B, _, T, _ = keys.shape
    layer = RaggedLayer(GivenPolicy(plans=plans), 0, 1, reserve=reserve)
    layer.update(keys, values)
    layer.set_valid(None, B, T)
    layer.compress()
    return layer


def reference_decode(q, keys, values, plans, new_k=None, new_v=None, scale=None):
    """float64 reference: attention of q (B, H, T_q, D) over the kept prompt entries (+ extras, with
    their log weights) and the T_q new entries (causal among themselves), as a masked dense call."""
    B, Hq, Tq, D = q.shape
    H_kv, T = keys.shape[1], keys.shape[2]
    rep = Hq // H_kv
    E = max([k.extra_keys.shape[1] if k.extra_keys is not None else 0 for plan in plans for k in plan] + [0])
    ek = torch.zeros(B, H_kv, E, D, dtype=keys.dtype)
    ev = torch.zeros(B, H_kv, E, values.shape[-1], dtype=values.dtype)
    keep = torch.zeros(B, H_kv, T + E, dtype=torch.bool)
    bias = torch.zeros(B, H_kv, T + E, dtype=torch.float64)
    for b, plan in enumerate(plans):
        for k in plan:
            for g, h in enumerate(k.heads.tolist()):
                keep[b, h, k.index[g]] = True
                if k.extra_keys is not None:
                    e = k.extra_keys.shape[1]
                    ek[b, h, :e], ev[b, h, :e] = k.extra_keys[g], k.extra_values[g]
                    keep[b, h, T:T + e] = True
                    if k.extra_log_weight is not None:
                        bias[b, h, T:T + e] = k.extra_log_weight[g].double()
    K, V = torch.cat([keys, ek], 2), torch.cat([values, ev], 2)
    mask = keep.repeat_interleave(rep, 1).unsqueeze(2).expand(B, Hq, Tq, T + E)
    if new_k is not None:
        K, V = torch.cat([K, new_k], 2), torch.cat([V, new_v], 2)
        causal = torch.ones(Tq, Tq, dtype=torch.bool).tril()
        mask = torch.cat([mask, causal.expand(B, Hq, Tq, Tq)], 3)
        bias = torch.cat([bias, torch.zeros(B, H_kv, Tq, dtype=torch.float64)], 2)
    full_bias = bias.repeat_interleave(rep, 1).unsqueeze(2)  # (B, Hq, 1, N)
    return reference.attention(q, K, V, mask=mask, scale=scale,
                               score_mod=lambda s, *idx: s + full_bias)


def kept(keeps) -> dict[int, list[int]]:
    """{kv head: kept positions} from a list of Keep."""
    out = {}
    for k in keeps:
        for g, h in enumerate(k.heads.tolist()):
            out[h] = k.index[g].tolist()
    return out
