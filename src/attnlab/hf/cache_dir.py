"""Where attnlab keeps converted model weights: one user cache directory, written atomically."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def cache_root() -> Path:
    """The attnlab cache directory: ``$ATTNLAB_CACHE``, else ``$XDG_CACHE_HOME/attnlab``, else ``~/.cache/attnlab``."""
    if os.environ.get("ATTNLAB_CACHE"):
        return Path(os.environ["ATTNLAB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "attnlab"


def atomic_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Create directory ``final`` by calling ``write(tmp)`` on a fresh temporary sibling, then renaming it.

    A crash inside ``write`` leaves no half-written ``final`` behind (only a ``.tmp-*`` sibling, removed
    here on ordinary exceptions). If another process finished ``final`` first, its copy is kept.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # the rename failed for another reason than a concurrent winner
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
