"""transformers integration: offline loading and attaching attnlab's attention call."""
from .load import load

__all__ = ["load"]
