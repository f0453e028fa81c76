"""Shared fixtures: the real embedded models, loaded once per test session.

The models are shared by every test: a test that attaches to one must detach (use ``with attach(...)``)
and must not change its weights. The first run on a clean machine converts the SmolLM2 GGUF file once
(~30 s) into the user cache (``$ATTNLAB_CACHE`` or ``~/.cache/attnlab``); later sessions load in seconds.
"""
from __future__ import annotations

import pytest
import torch

from attnlab.hf import load


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer): SmolLM2-135M-Instruct, float32, eval, sdpa (Llama: 30 layers, 9 q heads, 3 kv heads)."""
    model, tokenizer = load("smollm2", dtype=torch.float32)
    return model, tokenizer


@pytest.fixture(scope="session")
def minilm():
    """(model, tokenizer): all-MiniLM-L6-v2 BertModel, float32, eval, sdpa (6 layers, 12 heads, noncausal)."""
    model, tokenizer = load("minilm", dtype=torch.float32)
    return model, tokenizer
