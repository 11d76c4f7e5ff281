"""Backend registry: which implementation of each op runs for a tensor.

Every op has a pure-PyTorch ``reference`` implementation that works on any device. Fast
backends (``cpp``, ``triton``, ``cuda``) register per-op kernels for the devices they serve
from one module each under ``splitkernels/_backends/``. Nothing above the op layer knows
which backend ran.
"""
from __future__ import annotations

import contextlib
import importlib
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

BACKEND_NAMES = ("reference", "cpp", "triton", "cuda")
# Preference order per device type when the user has not chosen a backend.
_DEFAULT_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("triton", "cuda", "reference")}


@dataclass
class Backend:
    """One backend: the device types it serves, its kernels, and why it may be missing."""

    name: str
    devices: tuple[str, ...]
    kernels: dict[str, Callable] = field(default_factory=dict)
    unavailable_reason: str | None = None
    install_hint: str = ""

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None


_registry: dict[str, Backend] = {}
_local = threading.local()
_loaded = False
_load_lock = threading.Lock()


def register_backend(backend: Backend) -> Backend:
    """Add a backend (called by the modules under ``splitkernels._backends``)."""
    _registry[backend.name] = backend
    return backend


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    with _load_lock:
        if _loaded:
            return
        for name in BACKEND_NAMES:
            # A backend module never raises on import: it registers itself as unavailable.
            importlib.import_module(f"splitkernels._backends.{name}")
        _loaded = True


def backends() -> dict[str, dict]:
    """Report every backend: availability, devices served, ops implemented and, if missing, why."""
    _ensure_loaded()
    return {
        name: {
            "available": b.available,
            "devices": list(b.devices),
            "ops": sorted(b.kernels),
            "reason": b.unavailable_reason,
        }
        for name, b in ((n, _registry[n]) for n in BACKEND_NAMES)
    }


def get_backend(name: str) -> Backend:
    _ensure_loaded()
    if name not in _registry:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    return _registry[name]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (``reference``, ``cpp``, ``triton``, ``cuda``).

    Raises ``RuntimeError`` with an install hint when the backend is not available here.
    Inside the block, an op that the backend does not implement, or a tensor on a device the
    backend does not serve, raises rather than silently falling back.
    """
    backend = get_backend(name)
    if not backend.available:
        raise RuntimeError(
            f"backend {name!r} is not available: {backend.unavailable_reason}. {backend.install_hint}".strip()
        )
    previous = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = previous


def current_backend() -> str | None:
    """The backend forced by the innermost ``use_backend`` block, or None."""
    return getattr(_local, "forced", None)


def resolve(op: str, device: torch.device) -> Callable:
    """Return the kernel for ``op`` on ``device``: the forced backend, else the fastest available."""
    _ensure_loaded()
    forced = current_backend()
    if forced is not None:
        backend = _registry[forced]
        if device.type not in backend.devices and "*" not in backend.devices:
            raise RuntimeError(f"backend {forced!r} does not serve {device.type} tensors (op {op})")
        if op not in backend.kernels:
            raise RuntimeError(f"backend {forced!r} has no kernel for op {op!r}")
        return backend.kernels[op]
    for name in _DEFAULT_ORDER.get(device.type, ("reference",)):
        backend = _registry[name]
        if backend.available and device.type in backend.devices and op in backend.kernels:
            return backend.kernels[op]
    return _registry["reference"].kernels[op]
