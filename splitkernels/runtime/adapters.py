"""Moved to :mod:`splitkernels.models.split` (one generic split path for every family); this
module keeps the older import path working."""
from __future__ import annotations

import warnings

from ..models.split import Adapter, adapter_for, register_adapter, supported_families

__all__ = ["Adapter", "adapter_for", "register_adapter", "supported_families"]

# The per-family adapters of earlier versions: every family now takes the generic path.
_FORMER = ("LlamaStyleAdapter", "GPT2Adapter", "OPTAdapter")


def __getattr__(name: str):
    if name in _FORMER:
        warnings.warn(f"splitkernels.runtime.adapters.{name} is deprecated: the generic "
                      "splitkernels.models.Adapter runs every family", DeprecationWarning, stacklevel=2)
        return Adapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
