"""The one on-disk cache root: ``$SPLITKERNELS_CACHE``, default ``~/.cache/splitkernels``.

Tuned kernel configs, measured dispatch tables and unpacked model files live under it.
``SPLITKERNELS_CACHE_DIR`` is the old name of the variable and is still read when the new one
is unset.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV = "SPLITKERNELS_CACHE"
_OLD_ENV = "SPLITKERNELS_CACHE_DIR"


def cache_root() -> Path:
    """The cache folder (not created here)."""
    root = os.environ.get(ENV) or os.environ.get(_OLD_ENV)
    return Path(root) if root else Path.home() / ".cache" / "splitkernels"


__all__ = ["ENV", "cache_root"]
