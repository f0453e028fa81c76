"""KV-cache policies that really save memory: a ragged per-head cache and the policies that fill it.

Policies (``POLICIES``, name -> class; each one file, paper in its docstring):

    full       keep everything (baseline)                                   full.py
    streaming  sinks + recent window, constant size while decoding          streaming.py  (StreamingLLM)
    snapkv     observation-window votes, pooled, + the window               snapkv.py     (SnapKV)
    h2o        heavy hitters + recent, evicting while decoding              h2o.py        (H2O)
    razor      retrieval heads full; others sinks + snap + recent + comp.   razor.py      (RazorAttention+)
    moa        per-head elastic windows alpha + beta * N, profiled          moa.py        (MoA)
    task_kv    heterogeneous heads full; others sinks + middle + recent     task_kv.py    (Task-KV)

Adding a policy: a ``@dataclass`` subclass of :class:`Policy` (``kv/base.py``) with a ``name`` and
``select(view: PrefillView) -> list[Keep]``: for one layer and one sample, given the post-RoPE keys
(H_kv, T, D), values, and (if the class sets ``scores = "window"`` or ``"all"``) the attention
mass each key received (H_kv, T), return groups of KV heads with the prompt positions each keeps
(same count within a group) and optional synthetic entries. Optional: ``evict`` (decode-time
eviction for ``Keep(fixed_size=True)``), ``tracks_scores``, ``prepare(model)``. Then add it to
``POLICIES`` below. ``budget`` is always the fraction of KV bytes kept, in (0, 1].

Use::

    from attnlab import kv
    with kv.apply(model, "razor", budget=0.3) as session:
        out = model.generate(ids, **kv.cache_kwargs(model, session.new_cache()), max_new_tokens=20)
        session.cache.kept_bytes(), session.cache.full_bytes()

or ``kv.generate(model, ids, kv.make_policy("snapkv", budget=0.3))``. ``attnlab kv eval`` and
``attnlab kv sweep`` measure accuracy, kept bytes and speed on the long-context tasks.
"""
from __future__ import annotations

from .base import Keep, Policy, PrefillView, check_budget
from .cache import Group, RaggedCache, RaggedLayer
from .full import Full
from .h2o import H2O
from .moa import MoA, MoAProfile
from .razor import Razor
from .session import KVSession, UnsupportedModelError, apply, cache_kwargs, check_model, generate
from .snapkv import SnapKV
from .streaming import Streaming
from .task_kv import TaskKV

POLICIES: dict[str, type[Policy]] = {
    "full": Full,
    "streaming": Streaming,
    "snapkv": SnapKV,
    "h2o": H2O,
    "razor": Razor,
    "moa": MoA,
    "task_kv": TaskKV,
}


def make_policy(name: str, **kwargs) -> Policy:
    """The policy registered as ``name``, built with ``kwargs`` (e.g. ``budget=0.3``)."""
    if name not in POLICIES:
        raise ValueError(f"unknown KV policy {name=}; known policies: {', '.join(POLICIES)}")
    return POLICIES[name](**kwargs)


__all__ = [
    "POLICIES", "make_policy", "Policy", "PrefillView", "Keep", "check_budget",
    "RaggedCache", "RaggedLayer", "Group", "KVSession", "UnsupportedModelError",
    "apply", "cache_kwargs", "check_model", "generate",
    "Full", "Streaming", "SnapKV", "H2O", "Razor", "MoA", "MoAProfile", "TaskKV",
]
