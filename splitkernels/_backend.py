"""Deprecated: the registry moved to :mod:`splitkernels.registry`; this module re-exports it."""
import warnings

from .registry import Backend, backends, current_backend, get_backend, resolve, use_backend

warnings.warn(
    "splitkernels._backend is deprecated; use splitkernels.registry", DeprecationWarning, stacklevel=2
)

__all__ = ["Backend", "backends", "current_backend", "get_backend", "resolve", "use_backend"]
