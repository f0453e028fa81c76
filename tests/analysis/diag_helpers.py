"""Helpers for diagnostics tests: full eager attention maps of the shared real models (the reference)."""
from __future__ import annotations

import contextlib

import torch

KJV = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
    "And God said, Let there be light: and there was light."
)


@contextlib.contextmanager
def eager(model):
    """Temporarily switch a shared model to eager attention (restored after)."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def eager_maps(model, **inputs) -> tuple[torch.Tensor, ...]:
    """One (B, H, N, N) float32 map per layer, from transformers' own eager attention."""
    with eager(model), torch.no_grad():
        return model(**inputs, output_attentions=True).attentions


def assert_close(a, b, atol=1e-5, path="result"):
    """Recursive equality of JSON-like results, numbers to ``atol``."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys differ {set(a) ^ set(b)}"
        for k in a:
            assert_close(a[k], b[k], atol, f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, atol, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= atol, f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
