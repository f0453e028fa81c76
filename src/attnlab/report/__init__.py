"""Reports a person can read: ``attnlab inspect`` (JSON + one self-contained HTML page) and its figures."""
from .html import render
from .inspect import InspectError, inspect_text, write_report

__all__ = ["inspect_text", "write_report", "render", "InspectError"]
