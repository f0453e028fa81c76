"""transformers integration: offline loading and attaching attnlab's attention call."""
from .attach import Attachment, IncompatibleModelError, attach, attention_layers
from .chunked import chunked_attention
from .load import load

__all__ = ["load", "attach", "Attachment", "IncompatibleModelError", "attention_layers", "chunked_attention"]
