"""Fixtures for diagnostics tests."""
from __future__ import annotations

import pytest

from diag_helpers import KJV


@pytest.fixture(scope="session")
def kjv_text():
    """A few verses of KJV Genesis 1 (public domain): ~60 SmolLM2 tokens."""
    return KJV
