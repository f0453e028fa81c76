"""Patterns: composable attention masks (``&``, ``|``) with analytic block layouts."""
from .base import And, BlockLayout, Or, Pattern
from .causal import Causal, causal

__all__ = ["Pattern", "BlockLayout", "And", "Or", "Causal", "causal"]
