"""EchoAtt, training-free: later layers reuse an earlier similar layer's attention probabilities.

Paper: "EchoAtt: Attend, Copy, then Adjust for More Efficient Large Language Models" (arXiv 2409.14595,
ENLSP @ NeurIPS 2024). Inner layers of LLMs have very similar attention maps; EchoAtt lets the layers
of a highly similar block share (copy) the attention matrix of the block's first layer, then trains
the student with knowledge distillation from the original model.

Training-free form here:

* similarity, measured on calibration prompts (first ``max_tokens`` tokens of each): for layers
  a < l, heads g of a and h of l, overlap(a, g; l, h) = mean over query rows i of
  sum_j min(P_a[g, i, j], P_l[h, i, j]) (1 minus the total-variation distance, in [0, 1]);
* head matching (our addition, standing in for the paper's distillation): head h of a sharing layer l
  copies the anchor's head g*(h) = argmax_g overlap(a, g; l, h); the layer similarity is the mean
  over h of that best overlap;
* groups, greedy over layers ``first .. last``: layer l joins the current anchor a when
  l - a <= ``max_span`` and similarity(a, l) >= ``threshold``,
  otherwise l becomes the next anchor; with ``max_shared``, only the most similar sharing layers are
  kept. The first and last layers are left alone by default, as the paper shares inner layers;
* at run time a sharing layer's probabilities are replaced by the anchor's (matched heads):
  output_l = P_a[g*(h)] @ V_l[h], (B, H, T_q, D_v); its own V is still used.

Cost: :func:`echoatt` attaches :class:`FusedEchoAttention`: every layer keeps fused SDPA; the anchor
also computes its probabilities, (B, H, T_q, T_kv) float32, held until its last sharing layer has
run, and a sharing layer replaces SDPA's output by one P @ V matmul. (:class:`EchoAttention` does the
same on attnlab's exact chunked path, where observers see the shared probabilities; it cost +44% at
1K tokens, against a few percent for the fused form.) The training-free form saves no compute (a
sharing layer's own attention still runs); it measures what sharing does to quality.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..probes.base import CallContext, Observer
from ._redistribute import Handle, head_probs
from .base import Modifier

PAPER = "EchoAtt: Attend, Copy, then Adjust for More Efficient Large Language Models"


class EchoAttention(Modifier):
    """Replace each sharing layer's probabilities by its anchor's (matched heads).

    Args:
        shares: {sharing layer: (anchor layer, (H,) anchor head for each query head)}; anchor < layer,
            and no anchor is itself a sharing layer.
    """

    needs_probs = True

    def __init__(self, shares: dict[int, tuple[int, Sequence[int]]]) -> None:
        for layer, (anchor, heads) in shares.items():
            if not 0 <= anchor < layer:
                raise ValueError(f"anchor must come before its sharing layer; got {anchor=} for {layer=}")
            if anchor in shares:
                raise ValueError(f"an anchor cannot itself share another layer's probabilities; got {anchor=}")
        self.shares = {layer: (anchor, torch.as_tensor(list(heads), dtype=torch.long)) for layer, (anchor, heads) in shares.items()}
        self.anchors = frozenset(anchor for anchor, _ in self.shares.values())
        self.layers = frozenset(self.shares) | self.anchors  # only these leave SDPA
        self._last_user = {a: max(l for l, (b, _) in self.shares.items() if b == a) for a in self.anchors}
        self._store: dict[tuple[int, int], torch.Tensor] = {}

    def modify_probs(self, ctx: CallContext, q_start: int, probs: torch.Tensor) -> torch.Tensor:
        if ctx.layer in self.anchors:
            self._store[(ctx.layer, q_start)] = probs  # (B, H, C, T_kv); the chunked path never writes into it
            return probs
        share = self.shares.get(ctx.layer)
        if share is None:
            return probs
        anchor, heads = share
        key = (anchor, q_start)
        stored = self._store.get(key)
        if stored is None or stored.shape[0] != probs.shape[0] or stored.shape[2:] != probs.shape[2:]:
            raise RuntimeError(f"layer {ctx.layer} found no matching probabilities of its anchor layer {anchor} "
                               "(the anchor must run earlier in the same forward call, with the same mask)")
        if self._last_user[anchor] == ctx.layer:
            del self._store[key]
        return stored.index_select(1, heads.to(stored.device))

    def __repr__(self) -> str:
        return f"EchoAttention({ {l: a for l, (a, _) in sorted(self.shares.items())} })"


class FusedEchoAttention(Modifier):
    """:class:`EchoAttention` that keeps fused SDPA everywhere (what :func:`echoatt` attaches).

    An anchor's probabilities (B, H, T_q, T_kv) float32 are computed from its queries and keys in
    ``score_bias`` (which returns no bias, so SDPA runs unchanged); a sharing layer's SDPA output is
    replaced in ``modify_output`` by P_a[g*(h)] @ V_l[h // G]. V_l comes from the hooks of
    :func:`attach_fused` (the layer's KV cache when there is one, else its v_proj output), so no layer
    computes explicit scores of its own. Same maths as :class:`EchoAttention` (float32, to rounding).
    Observers attached beside it see each sharing layer's own probabilities, not the copied ones.

    Args:
        shares: as :class:`EchoAttention`.
    """

    def __init__(self, shares: dict[int, tuple[int, Sequence[int]]]) -> None:
        exact = EchoAttention(shares)  # validates
        self.shares, self.anchors, self.layers = exact.shares, exact.anchors, exact.layers
        self._last_user = exact._last_user
        self._store: dict[int, torch.Tensor] = {}
        self._new_values: dict[int, torch.Tensor] = {}  # sharing layer -> v_proj output (B, T, H_kv * D_v)
        self._caches: dict[int, object] = {}  # sharing layer -> the cache its forward call got (or None)

    def score_bias(self, ctx: CallContext) -> None:
        if ctx.layer in self.anchors:
            self._store[ctx.layer], _ = head_probs(ctx, range(ctx.extra["query"].shape[1]))
        return None

    def _values(self, ctx: CallContext, d_v: int) -> torch.Tensor:
        """(B, H_kv, T_kv, D_v) the values this sharing layer's attention call got."""
        cache = self._caches.get(ctx.layer)
        if cache is not None:
            v = cache.layers[ctx.module.layer_idx].values[:, :, :ctx.n_kv]
        else:
            new = self._new_values[ctx.layer]
            v = new.view(new.shape[0], new.shape[1], -1, d_v).transpose(1, 2)
        if v.shape[2] != ctx.n_kv:
            raise RuntimeError(f"layer {ctx.layer}: found values for {v.shape[2]} keys, the call has {ctx.n_kv}")
        return v

    def modify_output(self, ctx: CallContext, output: torch.Tensor) -> torch.Tensor:
        share = self.shares.get(ctx.layer)
        if share is None:
            return output
        anchor, heads = share
        probs = self._store.get(anchor)
        if probs is None or probs.shape[0] != output.shape[0] or probs.shape[2:] != (ctx.n_q, ctx.n_kv):
            raise RuntimeError(f"layer {ctx.layer} found no matching probabilities of its anchor layer {anchor} "
                               "(the anchor must run earlier in the same forward call, with the same mask)")
        if self._last_user[anchor] == ctx.layer:
            del self._store[anchor]
        v = self._values(ctx, output.shape[-1]).float()  # (B, H_kv, T_kv, D_v)
        heads = heads.to(probs.device)
        group = probs.shape[1] // v.shape[1]
        # query head h reads the anchor's head g*(h) and its own kv head h // G
        return (probs.index_select(1, heads) @ v.repeat_interleave(group, dim=1)).to(output.dtype)

    def __repr__(self) -> str:
        return f"FusedEchoAttention({ {l: a for l, (a, _) in sorted(self.shares.items())} })"


def attach_fused(model: torch.nn.Module, modifier: FusedEchoAttention):
    """Attach ``modifier`` with the hooks that hand each sharing layer its values; returns a Handle."""
    from ..hf.attach import attach, attention_layers  # lazy: hf.attach imports this package's base

    modules = attention_layers(model)
    hooks = []
    for layer in sorted(modifier.shares):
        attn = modules[layer]

        def keep_cache(_module, args, kwargs, layer=layer):
            modifier._caches[layer] = kwargs.get("cache", kwargs.get("past_key_values"))

        def keep_values(_module, args, out, layer=layer):
            modifier._new_values[layer] = out

        hooks.append(attn.register_forward_pre_hook(keep_cache, with_kwargs=True))
        hooks.append(attn.v_proj.register_forward_hook(keep_values))
    try:
        attachment = attach(model, modifiers=[modifier])
    except BaseException:
        for h in hooks:
            h.remove()
        raise
    return Handle(attachment, hooks)


class _Maps(Observer):
    """Keeps each layer's full probability map (B, H, T, T) of one short forward call."""

    def __init__(self) -> None:
        self.maps: dict[int, torch.Tensor] = {}

    def observe(self, ctx: CallContext, q_start: int, probs: torch.Tensor) -> None:
        if q_start == 0:
            self.maps[ctx.layer] = torch.zeros(probs.shape[0], probs.shape[1], ctx.n_q, ctx.n_kv)
        self.maps[ctx.layer][:, :, q_start:q_start + probs.shape[2]] = probs


def head_overlap(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(H_p, H_q) overlap sum_j min(p, q) averaged over rows, for maps p (H_p, T, T_kv) and q (H_q, T, T_kv)."""
    return torch.stack([torch.minimum(p, q[h]).sum(-1).mean(-1) for h in range(q.shape[0])], dim=1)


def attention_overlap(
    model: torch.nn.Module, calibration: Sequence[Sequence[int]], *, max_span: int = 4, max_tokens: int = 128
) -> dict[tuple[int, int], torch.Tensor]:
    """{(a, l): (H, H) head overlap of layers a < l <= a + max_span}, averaged over ``calibration``."""
    from ..hf.attach import attach  # lazy: hf.attach imports this package's base

    device = next(model.parameters()).device
    total: dict[tuple[int, int], torch.Tensor] = {}
    for ids in calibration:
        maps = _Maps()
        with attach(model, [maps]), torch.no_grad():
            model(input_ids=torch.tensor([list(ids)[:max_tokens]], device=device), use_cache=False)
        n = len(maps.maps)
        for a in range(n):
            for l in range(a + 1, min(n, a + max_span + 1)):
                o = head_overlap(maps.maps[a][0], maps.maps[l][0])
                total[(a, l)] = total.get((a, l), 0) + o / len(calibration)
    return total


def share_groups(
    overlap: dict[tuple[int, int], torch.Tensor], n_layers: int, *, threshold: float, max_span: int = 4,
    max_shared: int | None = None, first: int = 1, last: int | None = None,
) -> dict[int, tuple[int, list[int]]]:
    """Greedy groups (module docstring): {sharing layer: (anchor, matched anchor head per query head)}."""
    last = n_layers - 2 if last is None else last
    shares: dict[int, tuple[int, list[int]]] = {}
    similarity: dict[int, float] = {}
    anchor = None
    for layer in range(first, last + 1):
        if anchor is not None and layer - anchor <= max_span:
            best, heads = overlap[(anchor, layer)].max(dim=0)  # over the anchor's heads, per head of `layer`
            if float(best.mean()) >= threshold:
                shares[layer], similarity[layer] = (anchor, heads.tolist()), float(best.mean())
                continue
        anchor = layer
    if max_shared is not None:  # keep the most similar; dropping a sharing layer never orphans an anchor
        keep = sorted(shares, key=lambda l: -similarity[l])[:max_shared]
        shares = {l: shares[l] for l in sorted(keep)}
    return shares


def echoatt(
    model: torch.nn.Module,
    tokenizer=None,
    calibration: Sequence[Sequence[int]] = (),
    *,
    threshold: float = 0.8,
    max_span: int = 4,
    max_shared: int | None = None,
    max_tokens: int = 128,
):
    """Measure attention similarity on ``calibration``, pick sharing groups, attach :class:`EchoAttention`.

    Args:
        calibration: token-id prompts (dev split); the first ``max_tokens`` tokens of each are used.
        threshold: minimum layer similarity in [0, 1] to share. max_span: how far a sharing layer may
            be from its anchor (>= 1). max_shared: cap on sharing layers (None: no cap).
        tokenizer: unused (the registry's common signature).

    Returns:
        A handle (the attachment plus :func:`attach_fused`'s hooks) with ``shares`` ({layer: (anchor, heads)}) and ``similarity``
        ({(anchor, layer): mean best head overlap}) set on it; ``detach()`` restores the model.
        With no pair similar enough, nothing is shared and the model is unchanged.
    """
    from ..hf.attach import attach  # lazy: hf.attach imports this package's base

    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a number in [0, 1]; got {threshold=!r}")
    for name, v in (("max_span", max_span), ("max_tokens", max_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1; got {name}={v!r}")
    if max_shared is not None and (isinstance(max_shared, bool) or not isinstance(max_shared, int) or max_shared < 0):
        raise ValueError(f"max_shared must be None or an int >= 0; got {max_shared=!r}")
    if isinstance(calibration, (str, bytes)) or not calibration or not all(len(p) > 0 for p in calibration):
        raise ValueError("calibration must be a non-empty list of non-empty token-id prompts (similarity is measured on it)")
    overlap = attention_overlap(model, calibration, max_span=max_span, max_tokens=max_tokens)
    n_layers = 1 + max(l for _, l in overlap)
    shares = share_groups(overlap, n_layers, threshold=float(threshold), max_span=max_span, max_shared=max_shared)
    handle = attach_fused(model, FusedEchoAttention(shares)) if shares else attach(model, modifiers=[])
    handle.shares = shares
    handle.similarity = {pair: float(o.max(dim=0).values.mean()) for pair, o in overlap.items()}
    return handle
