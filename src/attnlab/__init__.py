"""attnlab: the attention mechanism in transformers, in one place."""
from .core import reference
from .core.patterns import (
    Pattern,
    block_sparse,
    blocked,
    causal,
    document,
    inverse_permutation,
    neighborhood,
    prefix_lm,
    sliding_window,
)

from .hf import Attachment, attach, load
from .kernels import attention
from .analysis import run_diagnostics

__version__ = "0.1.0"
__all__ = [
    "reference", "Pattern", "causal", "__version__",
    "sliding_window", "prefix_lm", "document", "block_sparse", "neighborhood", "blocked", "inverse_permutation",
]
__all__ += ["load", "attach", "Attachment"]
__all__ += ["attention"]
__all__ += ["run_diagnostics"]
