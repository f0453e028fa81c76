"""Patterns: composable attention masks (``&``, ``|``) with analytic block layouts."""
from .base import And, BlockLayout, Not, Or, Pattern, inverse_permutation
from .block_sparse import BlockSparse, block_sparse, random_causal_layout
from .blocked import Blocked, blocked
from .causal import Causal, causal
from .document import Document, document
from .neighborhood import Neighborhood, neighborhood
from .permuted import Permuted
from .prefix_lm import PrefixLM, prefix_lm
from .sliding_window import SlidingWindow, sliding_window

__all__ = [
    "Pattern", "BlockLayout", "And", "Or", "Not", "inverse_permutation", "Permuted",
    "Causal", "causal", "SlidingWindow", "sliding_window", "PrefixLM", "prefix_lm",
    "Document", "document", "BlockSparse", "block_sparse", "random_causal_layout",
    "Neighborhood", "neighborhood", "Blocked", "blocked",
]
