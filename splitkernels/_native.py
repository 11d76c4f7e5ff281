"""Loads the torch-free extension modules without ever failing the package import."""
from __future__ import annotations

import importlib
from types import ModuleType

BUILD_HINT = "reinstall with `pip install .` from a source checkout (needs a C++17 compiler; CUDA kernels need nvcc)"


def load(name: str) -> tuple[ModuleType | None, str | None]:
    """Import ``splitkernels.<name>``; returns (module, None) or (None, reason)."""
    try:
        return importlib.import_module(f"splitkernels.{name}"), None
    except ImportError as exc:
        return None, f"extension splitkernels.{name} could not be imported ({exc})"
