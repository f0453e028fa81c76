"""attnlab: the attention mechanism in transformers, in one place."""
from .core import reference
from .core.patterns import Pattern, causal

from .hf import Attachment, attach, load
from .kernels import attention

__version__ = "0.1.0"
__all__ = ["reference", "Pattern", "causal", "__version__"]
__all__ += ["load", "attach", "Attachment"]
__all__ += ["attention"]
