"""Run a model with a KV-cache policy: an AttentionInterface function plus a ragged cache.

``apply(model, policy)`` registers one attention function (``"attnlab_kv"``) in transformers'
``AttentionInterface`` and switches the model to it; the returned :class:`KVSession` (a context
manager) restores the model on exit. Inside the function:

* prefill (the layer's cache holds the prompt's keys, not yet compressed): transformers' own SDPA
  computes the output over the *full* prompt, then the prefill scores the policy asks for are
  recomputed from the window queries (or in query chunks), and the layer is compressed;
* decode: attention runs over the ragged cache (:meth:`RaggedLayer.attend`).

A forward pre-hook reads the ``cache`` argument, so any number of caches can be used in turn; a
forward call without a :class:`RaggedCache` runs plain SDPA.

    with apply(model, "snapkv", budget=0.3) as kv:
        out = model.generate(ids, **cache_kwargs(model, kv.new_cache()), max_new_tokens=20)
"""
from __future__ import annotations

import collections
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..hf.attach import (
    IncompatibleModelError,
    attention_layers,
    restore_attn_implementations,
    saved_attn_implementations,
)
from .base import Policy
from .cache import RESERVE, RaggedCache
from .scores import WINDOW, accumulated_scores, window_scores

NAME = "attnlab_kv"
_SESSIONS: "weakref.WeakKeyDictionary[torch.nn.Module, KVSession]" = weakref.WeakKeyDictionary()


class UnsupportedModelError(ValueError):
    """The model has no KV cache that RaggedCache can stand in for."""


class KVSession:
    """A model running under one policy (or recording prefills with ``policy=None``).

    Attributes:
        model, policy, n_layers.
        cache: the RaggedCache of the forward call in progress (or the last one).
        forwards: [(query tokens, seconds)] of every forward call since the last ``reset_timing``.
    """

    def __init__(self, model, policy: Policy | None):
        self.model, self.policy = model, policy
        self.n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.cache: RaggedCache | None = None
        self.forwards: list[tuple[int, float]] = []
        self._saved: list[tuple[object, object]] = []
        self._hooks: list = []
        self._t0 = 0.0
        self.active = False

    def new_cache(self, *, reserve: int = RESERVE, score_kinds: frozenset[str] | None = None) -> RaggedCache:
        """A fresh RaggedCache for one generate() call (or one recording, with policy None)."""
        return RaggedCache(self.policy, self.n_layers, reserve=reserve, score_kinds=score_kinds)

    def reset_timing(self) -> None:
        self.forwards = []

    def _enable(self) -> None:
        _register()
        self._saved = saved_attn_implementations(self.model)
        for module in attention_layers(self.model).values():
            if _SESSIONS.get(module) is not None:
                raise ValueError("the model already runs under a KV policy; leave that session first")
            _SESSIONS[module] = self
        self._hooks = [self.model.register_forward_pre_hook(self._before, with_kwargs=True),
                       self.model.register_forward_hook(self._after)]
        self.active = True
        try:
            self.model.set_attn_implementation(NAME)
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Restore the model's attention implementation; idempotent."""
        if not self.active:
            return
        restore_attn_implementations(self._saved)
        for module in attention_layers(self.model).values():
            if _SESSIONS.get(module) is self:
                del _SESSIONS[module]
        for h in self._hooks:
            h.remove()
        self._hooks, self.active, self.cache = [], False, None

    def __enter__(self) -> "KVSession":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def _before(self, module, args, kwargs) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.cache = cache if isinstance(cache, RaggedCache) else None
        _sync(self.model)
        self._t0 = time.perf_counter()

    def _after(self, module, args, output) -> None:
        _sync(self.model)  # GPU work is asynchronous: time what finished
        ids = args[0] if args else None
        n = ids.shape[1] if isinstance(ids, torch.Tensor) and ids.dim() == 2 else -1
        self.forwards.append((n, time.perf_counter() - self._t0))


def _sync(model) -> None:
    device = getattr(model, "device", None)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def apply(model, policy: Policy | str | None, **policy_kwargs) -> KVSession:
    """Run ``model`` under a KV-cache policy; use the result as a context manager.

    Args:
        model: a decoder-only transformers model with a plain (non-sliding) KV cache whose attention
            goes through the AttentionInterface (e.g. SmolLM2 / Llama).
        policy: a Policy, a name in ``attnlab.kv.POLICIES`` (then ``policy_kwargs`` build it,
            e.g. ``budget=0.3``), or None to record prefills for :meth:`RaggedCache.compressed`.

    Raises:
        UnsupportedModelError: the model has no supported KV cache (encoders, sliding-window or
            linear-attention layers, no AttentionInterface).
        ValueError: unknown policy name or bad policy arguments.
    """
    check_model(model)
    if isinstance(policy, str):
        from . import make_policy

        policy = make_policy(policy, **policy_kwargs)
    elif policy_kwargs:
        raise ValueError(f"policy keyword arguments {sorted(policy_kwargs)} need a policy name, not {policy!r}")
    if policy is not None and not isinstance(policy, Policy):
        raise ValueError(f"policy must be an attnlab.kv Policy, a name or None; got {type(policy)=}")
    if policy is not None:
        policy.prepare(model)
    session = KVSession(model, policy)
    session._enable()
    return session


def check_model(model) -> None:
    """Raise UnsupportedModelError unless ``model`` is a decoder with a plain per-layer KV cache."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise UnsupportedModelError(f"model must be a transformers PreTrainedModel, got {type(model)=}")
    name = type(model).__name__
    config = model.config.get_text_config(decoder=True)
    if getattr(model.config, "is_encoder_decoder", False) or not model.can_generate():
        raise UnsupportedModelError(f"{name} is not a decoder-only generative model: it has no KV cache to compress")
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(f"{name} does not dispatch attention through transformers' AttentionInterface")
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"} or getattr(config, "sliding_window", None):
        raise UnsupportedModelError(f"{name} has layer types {sorted(types)} (or a sliding window); "
                                    "only full-attention KV caches are supported")
    layers = attention_layers(model)
    if len(layers) != config.num_hidden_layers:
        raise UnsupportedModelError(f"{name}: found {len(layers)} attention layers for {config.num_hidden_layers} "
                                    "decoder layers; cannot map cache layers")


def kv_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """attnlab's AttentionInterface function for ragged caches (see the module docstring).

    Args:
        query: (B, H, T_q, D); key, value: (B, H_kv, T_kv, D) as ``cache.update`` returned them;
        attention_mask: None or bool (B, 1, T_q, T_kv), True = visible.

    Returns:
        ((B, T_q, H, D_v), None).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    session = _SESSIONS.get(module)
    cache = session.cache if session is not None else None
    if cache is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    scaling = float(query.shape[-1] ** -0.5) if scaling is None else float(scaling)
    layer = cache.layers[module.layer_idx]
    if layer.pending is None:
        return layer.attend(query, scaling, module), None
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                    dropout=dropout, scaling=scaling, **kwargs)
    record_prefill(layer, query, key, attention_mask, scaling)
    if layer.policy is not None:
        layer.compress()
    return out, None


def record_prefill(layer, query, key, attention_mask, scaling: float) -> None:
    """Note which keys are real and compute the prefill scores the layer's policy (or recording) needs."""
    B, _, T, _ = key.shape
    valid = None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
        # The last query is a real token under left padding; the keys it may see are the real ones.
        valid = attention_mask[:, 0, -1, :T].expand(B, T)
        if bool(valid.all()):
            valid = None
    layer.set_valid(valid, B, T)
    policy = layer.policy
    for kind in layer.score_kinds:
        if kind == "window":
            window = policy.window if policy is not None and policy.scores == "window" else WINDOW
            layer.scores[kind] = window_scores(query, key, scaling, window, valid)
        elif kind == "all":
            layer.scores[kind] = accumulated_scores(query, key, scaling, valid)
        else:
            raise ValueError(f"unknown score kind {kind!r}; expected 'window' or 'all'")


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for ``model(...)`` / ``model.generate(...)``: transformers >= 5.2x calls the
    argument ``cache``, earlier 5.x releases (e.g. 5.17 on the GPU machine) ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if AttentionInterface._global_mapping.get(NAME) is not kv_attention:
        AttentionInterface.register(NAME, kv_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)


def generate(model, input_ids: torch.Tensor, policy: Policy | str, *, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 20, **generate_kwargs) -> tuple[torch.Tensor, RaggedCache]:
    """Greedy ``model.generate`` under ``policy``; returns (sequences (B, T + new), the final cache).

    Args:
        input_ids: (B, T) long, left-padded when B > 1 (pass ``attention_mask``).
        policy: a Policy or a policy name (with its default budget).
    """
    with apply(model, policy) as session:
        cache = session.new_cache(reserve=max_new_tokens + 1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        generate_kwargs.setdefault("do_sample", False)
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=attention_mask, **cache_kwargs(model, cache),
                                 max_new_tokens=max_new_tokens, **generate_kwargs)
    return out, cache


SYNC_OPS = {"_local_scalar_dense", "nonzero", "item"}  # a value read back to the host (.item(), int(), bool(), ...)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while it is active (``with OpCounter() as c: ...``).

    On a small model at batch 1 a GPU decode step is launch-bound: its time follows the number of ops
    launched, not the bytes read, so ops per step are a device-independent proxy for decode speed.

    Attributes:
        ops: non-view ops (views launch no kernel); ``by_op``: their counts by name.
        views: view ops.
        syncs: ops that make a CUDA host wait for the device: a value read back (``.item()``,
            ``int()``, ``bool()``, ``nonzero``), a copy between devices, or a Python number written
            through an index tensor (``t[idx] = 3`` copies the number to the device first).
    """

    def __init__(self):
        super().__init__()
        self.ops, self.views, self.syncs = 0, 0, 0
        self.by_op: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func.is_view:
            self.views += 1
        else:
            self.ops += 1
            self.by_op[name] += 1
        # A Python number written through an index (t[idx] = 3) arrives as a 0-dim CPU tensor: on CUDA it is
        # copied host -> device before the write, and that copy waits for the device.
        value = args[2] if name == "index_put_" and len(args) > 2 else None
        scalar_write = isinstance(value, torch.Tensor) and value.dim() == 0
        cross = name in ("copy_", "_to_copy") and (_devices(args) > 1 or (
            "device" in kwargs and kwargs["device"] is not None and torch.device(kwargs["device"]) != args[0].device))
        if name in SYNC_OPS or scalar_write or cross:
            self.syncs += 1
        return func(*args, **kwargs)


def _devices(args) -> int:
    return len({a.device for a in args if isinstance(a, torch.Tensor)})
