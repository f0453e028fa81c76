"""The case loop the H200 kernel scripts share (``h200_local.py``, ``h200_grouped.py``)."""
from __future__ import annotations

import os
import traceback
from typing import Callable, Sequence


def run_selected(cases: Sequence[tuple], run_case: Callable, notes: list, save: Callable[[], None]) -> None:
    """``run_case(*case)`` for the cases whose index is in the CASES environment variable ("0,3"; all when
    unset). A case that raises is noted and saved, and the others still run: one device call, many numbers."""
    only = os.environ.get("CASES")
    for i, c in enumerate(cases):
        if only and str(i) not in only.split(","):
            continue
        try:
            run_case(*c)
        except Exception as e:
            notes.append(f"case {c[0]} failed: {type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc()
            save()
