"""Observers (probes): streaming statistics of attention probabilities. Diagnostics live in attnlab.analysis."""
from .base import CallContext, Observer
from .replay import replay_maps
from .visibility import first_real_key, query_valid, visible_keys, visible_per_key, visible_per_query

__all__ = ["CallContext", "Observer", "replay_maps", "first_real_key", "query_valid", "visible_keys",
           "visible_per_key", "visible_per_query"]
