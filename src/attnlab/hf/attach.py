"""Attach observers and modifiers to any transformers model through its AttentionInterface.

attnlab registers ONE attention function (and its mask function) in transformers' process-wide
``AttentionInterface`` / ``AttentionMaskInterface`` under the name ``"attnlab"``, and switches an
attached model to it with ``set_attn_implementation``. No model code is re-implemented. What is
attached to which model lives on the :class:`Attachment`; the registry only maps each attention
module (weakly) to its attachment and layer index.

Inside the call:
    * nothing attached, or only ``modify_output`` modifiers: transformers' own SDPA function runs,
      so the cost is SDPA's (the per-head output, (B, H, T_q, D_v), is then handed to ``modify_output``);
    * modifiers with a ``score_bias``: column and rank-one biases become extra query/key dimensions
      (the causal kernel keeps running, no mask is built); other biases are folded into the float mask
      handed to SDPA (one (B|1, H|1, T_q, T_kv) mask per distinct bias tensor and forward call);
    * observers or score/prob modifiers: :func:`attnlab.hf.chunked.chunked_attention`, exact in
      float32, O(chunk x T_kv) memory per layer (score biases are added to its scores). Only the layers
      in the prob modifiers' ``layers`` take this path when no observer is attached.

Observers must not change the probabilities they are given in place (they may be the very tensor the
output is computed from); a change belongs in a modifier's ``modify_probs``. ``CallContext.key_padding``
marks the keys that some query may see: padding, and the unfilled slots of a static cache, are False.

Layers: ``module.layer_idx`` where the module has one; otherwise attention modules (modules whose
``forward`` calls ``ALL_ATTENTION_FUNCTIONS``) are numbered in ``model.modules()`` order at attach time.

Query positions (``CallContext.q_positions``): key j sits at cache slot j and query i at slot
offset + i, where offset is the cache's ``get_seq_length()`` when the forward call began (read by a
forward pre-hook; a static cache is longer than what it holds), else T_kv - T_q (no cache, or a cache
that does not say). With no mask, a causal call with 1 < T_q < T_kv (prefill into an empty static
cache) sees only the first T_q keys, upper-left aligned, as in transformers' SDPA path: the keys are
cropped to T_q.
"""
from __future__ import annotations

import inspect
import weakref
from typing import Iterable, NamedTuple

import torch

from ..interventions.base import Modifier, RankOneBias
from ..probes.base import CallContext, Observer
from .chunked import chunked_attention

NAME = "attnlab"

#: attention module -> (Attachment, layer index). Weak: a dropped model leaves nothing behind.
_ATTACHED: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[Attachment, int]]" = weakref.WeakKeyDictionary()
_ATTENTION_CLASSES: dict[type, bool] = {}  # class -> "its forward calls the AttentionInterface"


class IncompatibleModelError(ValueError):
    """The model does not route attention through transformers' AttentionInterface."""


class Attachment:
    """Observers and modifiers attached to one model; a context manager. See :func:`attach`.

    Attributes:
        model: the attached model.
        observers, modifiers: tuples, called in order.
        chunk: query rows per chunk on the exact path.
        n_layers: number of attention layers found.
        layers: {layer index: attention module}.
        input_ids: (B, T) input_ids of the latest forward call, or None (set by a forward pre-hook).
    """

    def __init__(self, model, observers: tuple, modifiers: tuple, chunk: int, layers: dict[int, torch.nn.Module]):
        self.model = model
        self.observers = observers
        self.modifiers = modifiers
        self.chunk = chunk
        self.layers = layers
        self.n_layers = len(layers)
        self.input_ids: torch.Tensor | None = None
        self.q_offset: int | None = None  # cache length when the current forward call began
        prob_mods = [m for m in modifiers if _changes_probs(m)]
        self.exact = bool(observers) or bool(prob_mods)
        # Layers on the exact path: all of them when observers watch or a prob modifier names no layers.
        self.exact_layers: frozenset[int] | None = (
            None if observers or any(getattr(m, "layers", None) is None for m in prob_mods)
            else frozenset().union(*(m.layers for m in prob_mods))
        )
        self.output_modifiers = tuple(m for m in modifiers if _overrides(m, "modify_output"))
        self.bias_modifiers = tuple(m for m in modifiers if _overrides(m, "score_bias"))
        self._folded: tuple | None = None  # (bias, attention_mask, folded mask) of the latest biased call
        self.active = False
        self._saved: list[tuple[object, object]] = []  # (config, its _attn_implementation_internal)
        self._hook = None
        self._padding_cache: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def _enable(self) -> None:
        _register()
        self._saved = saved_attn_implementations(self.model)
        for layer, module in self.layers.items():
            _ATTACHED[module] = (self, layer)
        self._hook = self.model.register_forward_pre_hook(self._remember_inputs, with_kwargs=True)
        self.active = True
        try:
            self.model.set_attn_implementation(NAME)
            if self.model.config._attn_implementation != NAME:
                raise IncompatibleModelError(
                    f"{type(self.model).__name__} did not accept attn_implementation={NAME!r}; "
                    "it does not dispatch attention through transformers' AttentionInterface"
                )
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Restore the model's previous attention implementation exactly; idempotent."""
        if not self.active:
            return
        restore_attn_implementations(self._saved)
        for module in self.layers.values():
            if _ATTACHED.get(module, (None,))[0] is self:
                del _ATTACHED[module]
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._padding_cache = (None, None)
        self._folded = None
        self.input_ids = self.q_offset = None
        self.active = False

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        return (
            f"Attachment({type(self.model).__name__}, observers={len(self.observers)}, "
            f"modifiers={len(self.modifiers)}, chunk={self.chunk}, active={self.active})"
        )

    def _remember_inputs(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.input_ids = ids if isinstance(ids, torch.Tensor) else None
        self._folded = None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.q_offset = None
        if cache is not None and hasattr(cache, "get_seq_length"):
            try:
                self.q_offset = int(cache.get_seq_length())
            except (TypeError, ValueError, RuntimeError, IndexError):
                self.q_offset = None

    def key_padding(self, allowed: torch.Tensor | None) -> torch.Tensor | None:
        """(B, T_kv) bool, True for keys some query may see; None when every key is visible.

        Cached per mask tensor: every layer of one forward gets the same mask object.
        """
        if allowed is None:
            return None
        last_mask, last = self._padding_cache
        if last_mask is allowed:
            return last
        seen = allowed.any(dim=-2).any(dim=1)  # (B, T_kv)
        pad = None if bool(seen.all()) else seen
        self._padding_cache = (allowed, pad)
        return pad


def attach(
    model,
    observers: Iterable[Observer] | Observer = (),
    modifiers: Iterable[Modifier] | Modifier = (),
    *,
    chunk: int = 256,
) -> Attachment:
    """Run ``model``'s attention through attnlab, showing it to ``observers`` and changing it by ``modifiers``.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention uses the AttentionInterface
            (``_supports_attention_backend``), e.g. Llama/SmolLM2 or BERT/MiniLM.
        observers: :class:`attnlab.probes.base.Observer` instances; each gets float32 probabilities
            (B, H, C, T_kv) per query chunk of every layer, then ``layer_done``.
        modifiers: :class:`attnlab.interventions.base.Modifier` instances, applied in order.
        chunk: query rows per chunk on the exact path (memory O(chunk x T_kv) per layer).

    Returns:
        An active :class:`Attachment`; use it as a context manager or call ``detach()``.

    Raises:
        ValueError: bad ``chunk``, a non-Observer in ``observers``, a non-Modifier in ``modifiers``,
            or a model that is already attached.
        IncompatibleModelError: the model does not dispatch attention through the AttentionInterface.
    """
    observers = _as_tuple(observers, Observer, "observers")
    modifiers = _as_tuple(modifiers, Modifier, "modifiers")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk must be a positive int, got {chunk=}")
    _check_model(model)
    layers = attention_layers(model)
    if any(_ATTACHED.get(m) is not None for m in layers.values()):
        raise ValueError(f"{type(model).__name__} is already attached; detach() the previous Attachment first")
    attachment = Attachment(model, observers, modifiers, chunk, layers)
    attachment._enable()
    return attachment


def saved_attn_implementations(model) -> list[tuple[object, object]]:
    """(config, its _attn_implementation_internal) for the model's config and every sub-config, so that
    switching the implementation can be undone exactly by :func:`restore_attn_implementations`."""
    configs = {id(model.config): model.config}
    for sub in model.modules():
        if hasattr(sub, "config") and hasattr(sub.config, "_attn_implementation_internal"):
            configs.setdefault(id(sub.config), sub.config)
    return [(c, c._attn_implementation_internal) for c in configs.values()]


def restore_attn_implementations(saved: list[tuple[object, object]]) -> None:
    for config, value in saved:
        config._attn_implementation_internal = value


def attention_layers(model) -> dict[int, torch.nn.Module]:
    """{layer index: attention module} of ``model``, in ``model.modules()`` order.

    A module counts as an attention layer when its class's ``forward`` calls transformers'
    ``ALL_ATTENTION_FUNCTIONS``. Its index is ``module.layer_idx`` when that is an int, else its
    rank among the attention modules.
    """
    modules = [m for m in model.modules() if _is_attention(type(m))]
    layers: dict[int, torch.nn.Module] = {}
    for rank, m in enumerate(modules):
        idx = getattr(m, "layer_idx", None)
        layers[idx if isinstance(idx, int) and idx not in layers else rank] = m
    return dict(sorted(layers.items()))


def attnlab_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """attnlab's AttentionInterface function.

    Args:
        query: (B, H, T_q, D); key, value: (B, H_kv, T_kv, D); attention_mask: None, bool
            (B, 1, T_q, T_kv) with True = visible, or an additive float mask of that shape.

    Returns:
        ((B, T_q, H, D_v) in the query's dtype, None), as every AttentionInterface function does.
    """
    sdpa_attention_forward = _sdpa()
    entry = _ATTACHED.get(module)
    if entry is None:  # a module of a model not attached (e.g. its config was copied): plain SDPA
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    att, layer = entry
    if not att.exact or (att.exact_layers is not None and layer not in att.exact_layers):
        if att.bias_modifiers:
            return _biased_sdpa(att, layer, module, query, key, value, attention_mask, dropout, scaling, kwargs)
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        if att.output_modifiers:
            ctx, _ = _prepare(att, layer, module, query, key, value, attention_mask, scaling, kwargs)
            heads = out.transpose(1, 2)  # (B, H, T_q, D_v)
            for m in att.output_modifiers:
                heads = m.modify_output(ctx, heads)
            out = heads.transpose(1, 2).contiguous()
        return out, None

    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attnlab's exact attention path does not support learned sinks ({name}) yet")
    ctx, parts = _prepare(att, layer, module, query, key, value, attention_mask, scaling, kwargs)
    if att.bias_modifiers:
        extra = _dense(_modifier_bias(att, ctx, query, parts.key, parts.value))
        if extra is not None:
            parts = parts._replace(bias=extra if parts.bias is None else parts.bias + extra)
    heads = chunked_attention(
        query, parts.key, parts.value, ctx,
        allowed=parts.allowed, causal_offset=parts.causal_offset, bias=parts.bias, scaling=ctx.scaling,
        softcap=kwargs.get("softcap"), dropout=dropout if module.training else 0.0,
        observers=att.observers, modifiers=att.modifiers, chunk=att.chunk,
    )  # (B, H, T_q, D_v) float32
    for m in att.output_modifiers:
        heads = m.modify_output(ctx, heads)
    for o in att.observers:
        o.layer_done(ctx)
    return heads.transpose(1, 2).contiguous().to(query.dtype), None


def _modifier_bias(att, ctx: CallContext, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor | None = None) -> list:
    """The modifiers' ``score_bias`` terms for this call: 4-D tensors and :class:`RankOneBias` (empty: no bias).

    While ``score_bias`` runs, ``ctx.extra`` holds the call's "query" (B, Hq, Nq, D), "key" (B, Hkv, Nk, D)
    and "value" (B, Hkv, Nk, Dv) (per KV head, as the model passed them; e.g. SeerAttention's output-aware
    target reads the values)."""
    ctx.extra["query"], ctx.extra["key"], ctx.extra["value"] = query, key, value
    terms = []
    try:
        for m in att.bias_modifiers:
            b = m.score_bias(ctx)
            if b is None:
                continue
            parts = (b.row, b.col) if isinstance(b, RankOneBias) else (b,)
            if not all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point() for t in parts):
                raise ValueError(
                    f"{type(m).__name__}.score_bias must return None, a RankOneBias or a 4-D float tensor "
                    f"broadcastable to (B, Hq, Nq, Nk); got {type(b).__name__} of shape {tuple(getattr(b, 'shape', ()))}"
                )
            terms.append(b)
    finally:
        del ctx.extra["query"], ctx.extra["key"], ctx.extra["value"]
    return terms


def _dense(terms: list) -> torch.Tensor | None:
    """The summed bias of ``terms`` as one broadcastable tensor, or None."""
    total = None
    for t in terms:
        d = t.dense() if isinstance(t, RankOneBias) else t
        total = d if total is None else total + d
    return total


def _biased_sdpa(att, layer, module, query, key, value, attention_mask, dropout, scaling, kwargs):
    """SDPA with the modifiers' logit bias: as extra q/k dimensions when it is low rank, else a folded float mask."""
    ctx, parts = _prepare(att, layer, module, query, key, value, attention_mask, scaling, kwargs)
    terms = _modifier_bias(att, ctx, query, parts.key, parts.value)
    rest = {k: v for k, v in kwargs.items() if k not in ("position_bias", "is_causal")}
    dropout = dropout if module.training else 0.0
    if not terms:
        out, _ = _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    elif kwargs.get("position_bias") is None and all(isinstance(t, RankOneBias) or t.shape[-2] == 1 for t in terms):
        out = _low_rank_sdpa(query, parts.key, parts.value, attention_mask, terms, ctx, dropout)
    else:
        bias = _dense(terms)
        folded = att._folded
        if folded is not None and folded[0] is terms[0] and len(terms) == 1 and folded[1] is attention_mask:
            mask = folded[2]  # layers sharing one bias tensor share one folded mask per forward call
        else:
            mask = _fold(parts, bias, query.shape[2], query.dtype)
            att._folded = (terms[0] if len(terms) == 1 else None, attention_mask, mask)
        out, _ = _sdpa()(module, query, parts.key, parts.value, mask, dropout=dropout, scaling=scaling, **rest)
    if att.output_modifiers:
        heads = out.transpose(1, 2)  # (B, H, T_q, D_v)
        for m in att.output_modifiers:
            heads = m.modify_output(ctx, heads)
        out = heads.transpose(1, 2).contiguous()
    return out, None


def _low_rank_sdpa(query, key, value, attention_mask, terms: list, ctx: CallContext, dropout: float) -> torch.Tensor:
    """(B, T_q, H, D_v): SDPA of q' = [q, r_1/s, ...], k' = [k, c_1, ...], so q'k'^T s = q k^T s + sum_t r_t c_t.

    Each column bias (1 row) or RankOneBias adds one dimension; v gets zero columns to match (the fused CPU
    kernel wants equal q/k/v widths), dropped from the output. No (T_q, T_kv) mask is built: the causal case
    keeps ``is_causal``. Query head h reads kv head h // (H / H_kv), as repeat_kv does.
    """
    b, h, n_q, d = query.shape
    n_kv, d_v = key.shape[2], value.shape[-1]
    group = h // key.shape[1]
    if group > 1:  # the extra key columns differ per query head
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    rows, cols = [], []
    for t in terms:
        row, col = (t.row, t.col) if isinstance(t, RankOneBias) else (query.new_ones(1, 1, 1, 1), t)
        rows.append((row / ctx.scaling).to(query.dtype).expand(b, h, n_q, 1))
        cols.append(col.to(query.dtype).transpose(-1, -2).expand(b, h, n_kv, 1))
    width = max(d + len(terms), d_v)
    q2 = torch.cat([query, *rows, query.new_zeros(b, h, n_q, width - d - len(terms))], -1)
    k2 = torch.cat([key, *cols, key.new_zeros(b, h, n_kv, width - d - len(terms))], -1)
    v2 = torch.cat([value, value.new_zeros(b, h, n_kv, width - d_v)], -1) if width > d_v else value
    mask = attention_mask[:, :, :, :n_kv] if attention_mask is not None and attention_mask.dim() == 4 else attention_mask
    out = torch.nn.functional.scaled_dot_product_attention(
        q2, k2, v2, attn_mask=mask, dropout_p=dropout, scale=ctx.scaling,
        is_causal=mask is None and ctx.causal and n_q > 1,
    )[..., :d_v]  # (B, H, T_q, D_v)
    return out.transpose(1, 2).contiguous()


def _fold(parts: "_Parts", bias: torch.Tensor, n_q: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive float mask (B|1, H|1, T_q, T_kv): bias (+ the call's own bias) where visible, dtype min elsewhere.

    The minimum, not -inf: a fully masked row (padding) then gets finite scores, as transformers' eager path does.
    """
    total = (bias if parts.bias is None else bias + parts.bias).to(dtype)
    visible = parts.allowed
    if parts.causal_offset is not None:
        n_kv = parts.key.shape[2]
        q = torch.arange(n_q, device=total.device)[:, None]
        causal = torch.arange(n_kv, device=total.device)[None, :] <= q + parts.causal_offset  # (T_q, T_kv)
        visible = causal if visible is None else visible & causal
    if visible is None:
        return total
    return torch.where(visible, total, torch.finfo(dtype).min)


class _Parts(NamedTuple):
    """What the exact path needs besides q: the (possibly cropped) keys/values and the mask, split."""

    key: torch.Tensor  # (B, H_kv, T_kv, D)
    value: torch.Tensor  # (B, H_kv, T_kv, D_v)
    allowed: torch.Tensor | None  # bool (B|1, 1|H, T_q, T_kv), True = visible
    causal_offset: int | None  # query i sees key j iff j <= i + causal_offset
    bias: torch.Tensor | None  # additive float logit bias


def _prepare(att, layer, module, query, key, value, attention_mask, scaling, kwargs) -> tuple[CallContext, _Parts]:
    """The call's CallContext and mask parts, from what transformers passed."""
    n_q, n_kv = query.shape[2], key.shape[2]
    is_causal = kwargs.get("is_causal")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    device = query.device
    q_offset = att.q_offset
    offset = q_offset if q_offset is not None and 0 <= q_offset <= n_kv - n_q else n_kv - n_q
    q_pos = torch.arange(offset, offset + n_q, device=device)
    allowed = causal_offset = bias = None
    if attention_mask is None:
        if causal and n_q > 1:
            # transformers' SDPA path uses upper-left is_causal here; T_kv > T_q only happens for a
            # prefill into an empty static cache, whose extra keys sdpa crops away: so do we.
            if n_kv > n_q:
                key, value, n_kv = key[:, :, :n_q], value[:, :, :n_q], n_q
            q_pos = torch.arange(n_q, device=device)
            causal_offset = 0
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        # Additive float mask (eager style): the dtype's minimum (or -inf) means "masked".
        allowed = attention_mask > torch.finfo(attention_mask.dtype).min
        bias = attention_mask.masked_fill(~allowed, 0.0)
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        bias = position_bias if bias is None else bias + position_bias
    ctx = CallContext(
        layer=layer,
        n_layers=att.n_layers,
        module=module,
        n_q=n_q,
        n_kv=n_kv,
        q_positions=q_pos,
        causal=causal,
        # Only a real mask can pad keys; the causal rule used for a None mask never does.
        key_padding=att.key_padding(allowed) if attention_mask is not None else None,
        scaling=float(query.shape[-1] ** -0.5) if scaling is None else float(scaling),
        extra={"position_ids": kwargs["position_ids"]} if kwargs.get("position_ids") is not None else {},
        input_ids=att.input_ids,
    )
    return ctx, _Parts(key, value, allowed, causal_offset, bias)


def _sdpa():
    """transformers' own SDPA attention function (imported lazily: importing attnlab stays light)."""
    global _SDPA
    if _SDPA is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        _SDPA = sdpa_attention_forward
    return _SDPA


_SDPA = None


def _register() -> None:
    """Register attnlab's attention and mask functions once per process (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    # The mask function must be registered too, or transformers passes no mask at all (no causality).
    if AttentionInterface._global_mapping.get(NAME) is not attnlab_attention:
        AttentionInterface.register(NAME, attnlab_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)


def _check_model(model) -> None:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise IncompatibleModelError(
            f"model must be a transformers PreTrainedModel, got {type(model)=}; attnlab attaches through "
            "transformers' AttentionInterface"
        )
    name = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False) or not model._can_set_attn_implementation():
        raise IncompatibleModelError(
            f"{name} does not dispatch attention through transformers' AttentionInterface "
            f"({name}._supports_attention_backend={getattr(model, '_supports_attention_backend', None)}), "
            "so attnlab cannot attach to it"
        )
    if not attention_layers(model):
        raise IncompatibleModelError(f"{name} has no module that calls transformers' AttentionInterface")


def _is_attention(cls: type) -> bool:
    if cls not in _ATTENTION_CLASSES:
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            src = ""
        _ATTENTION_CLASSES[cls] = "ALL_ATTENTION_FUNCTIONS" in src
    return _ATTENTION_CLASSES[cls]


def _as_tuple(items, kind: type, arg: str) -> tuple:
    if isinstance(items, kind):
        items = (items,)
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise ValueError(f"{arg} must be an iterable of {kind.__name__} instances, got {type(items)=}")
    items = tuple(items)
    for i, item in enumerate(items):
        if not isinstance(item, kind):
            raise ValueError(f"{arg}[{i}] must be an attnlab {kind.__name__}, got {type(item)=}")
    return items


def _overrides(obj, method: str) -> bool:
    return getattr(type(obj), method) is not getattr(Modifier, method)


def _changes_probs(m: Modifier) -> bool:
    return bool(getattr(m, "needs_probs", False)) or _overrides(m, "modify_scores") or _overrides(m, "modify_probs")
