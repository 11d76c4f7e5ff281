"""The kernel registry: which implementation of each op runs for a tensor.

Every module under ``splitkernels/_backends/`` is imported on first use and declares one
backend with :func:`declare_backend`, then its kernels with :meth:`Backend.kernel`: per op, the
device types served and a priority. Adding a backend is one new module there (plus its
kernels); nothing here or above lists backends by name. For each call the op layer asks
:func:`resolve` for a kernel: the backend forced by :func:`use_backend`, else the available
kernel with the highest priority for the tensor's device (``reference``, priority 0, serves
every device). A negative priority means "only when forced" (e.g. the Triton interpreter on
CPU tensors, used by tests).

A kernel may also come with a ``prepare`` function (:meth:`Backend.kernel`): given the
arguments that belong to a weight, it returns a callable that takes the per-call arguments and
does what the kernel would, with the work that depends on the weight alone done once. The op
layer keeps such prepared calls per weight (:mod:`splitkernels.ops.weight_plan`) and asks
:func:`dispatch_state` whether :func:`resolve` could now answer differently.

Kernels receive arguments already checked by the op layer (:mod:`splitkernels.ops`), where
each op's schema and checks are written once.
"""
from __future__ import annotations

import contextlib
import importlib
import pkgutil
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch

ANY_DEVICE = "*"


@dataclass(frozen=True)
class KernelEntry:
    """One kernel: the op it implements, its backend, the devices it serves and their priorities."""

    op: str
    backend: str
    fn: Callable
    priority: Mapping[str, int]  # device type (or "*") -> priority
    # (weight arguments) -> callable(per-call arguments); None: the op layer binds fn itself.
    prepare: Callable | None = None

    def priority_for(self, device_type: str) -> int | None:
        """Priority on ``device_type``, or None when this kernel does not serve it."""
        if device_type in self.priority:
            return self.priority[device_type]
        return self.priority.get(ANY_DEVICE)


@dataclass
class Backend:
    """One backend: its kernels, and why it is unavailable here (None when it is available)."""

    name: str
    unavailable_reason: str | None = None
    install_hint: str = ""
    entries: dict[str, KernelEntry] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None

    @property
    def kernels(self) -> dict[str, Callable]:
        """op -> kernel, empty when the backend is unavailable."""
        return {op: e.fn for op, e in self.entries.items()} if self.available else {}

    @property
    def devices(self) -> tuple[str, ...]:
        """Device types served by at least one kernel (empty when unavailable)."""
        if not self.available:
            return ()
        seen: dict[str, None] = {}
        for entry in self.entries.values():
            seen.update(dict.fromkeys(entry.priority))
        return tuple(seen)

    def kernel(
        self, op: str, priority: Mapping[str, int], prepare: Callable | None = None
    ) -> Callable[[Callable], Callable]:
        """Decorator: register the function as this backend's kernel for ``op``.

        ``priority`` maps the device types served (``"cpu"``, ``"cuda"``, ``"*"`` for any) to a
        priority: the highest available one wins, a negative one runs only when forced.
        ``prepare`` (optional; ops that take a weight, see the op's wrapper for its split of the
        arguments) returns, for a weight, a callable of the per-call arguments that may be
        reused while the weight's tensors keep their storage, shape, strides and dtype (their
        values may change in place between calls).
        """
        if op in self.entries:
            raise ValueError(f"backend {self.name!r} already has a kernel for op {op!r}")
        if not isinstance(priority, Mapping):
            raise TypeError(f"priority must map device types to ints, got {priority!r}")

        def register(fn: Callable) -> Callable:
            self.entries[op] = KernelEntry(op, self.name, fn, dict(priority), prepare)
            _changed()
            return fn

        return register

    def add_kernels(self, kernels: Mapping[str, Callable], priority: Mapping[str, int]) -> "Backend":
        """Register several kernels at one priority map (for kernels defined in another module)."""
        for op, fn in kernels.items():
            self.kernel(op, priority)(fn)
        return self


_registry: dict[str, Backend] = {}
# (op, device type) -> the default kernel's entry; every op call looks here, so it is cached.
_best: dict[tuple[str, str], KernelEntry] = {}
# Bumped whenever a backend or kernel is added: what resolve answers may have changed.
_generation = 0


class _Forced(threading.local):
    """The backend forced by ``use_backend`` in this thread (a class default, so that reading it
    where none was ever forced costs no AttributeError)."""

    forced: str | None = None


_local = _Forced()
_loaded = False
_load_lock = threading.RLock()


def _changed() -> None:
    global _generation
    _best.clear()
    _generation += 1


def declare_backend(name: str, unavailable_reason: str | None = None, install_hint: str = "") -> Backend:
    """Create and register a backend (called once by its module under ``splitkernels._backends``)."""
    if name in _registry:
        raise ValueError(f"backend {name!r} is declared twice")
    backend = Backend(name, unavailable_reason, install_hint)
    _registry[name] = backend
    _changed()
    return backend


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    with _load_lock:
        if _loaded:
            return
        from . import _backends

        # A backend module never raises on import: it declares itself unavailable instead.
        for info in sorted(pkgutil.iter_modules(_backends.__path__), key=lambda m: m.name):
            importlib.import_module(f"{_backends.__name__}.{info.name}")
        _loaded = True


def _ordered() -> list[Backend]:
    """Backends with ``reference`` first, then by name (a stable order for reports)."""
    _ensure_loaded()
    return sorted(_registry.values(), key=lambda b: (b.name != "reference", b.name))


def backend_names() -> tuple[str, ...]:
    """Names of every declared backend, available or not."""
    return tuple(b.name for b in _ordered())


def backends() -> dict[str, dict]:
    """Report every backend: availability, devices served, ops implemented and, if missing, why."""
    return {
        b.name: {
            "available": b.available,
            "devices": list(b.devices),
            "ops": sorted(b.kernels),
            "reason": b.unavailable_reason,
        }
        for b in _ordered()
    }


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ValueError listing the declared names otherwise."""
    _ensure_loaded()
    if name not in _registry:
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}")
    return _registry[name]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (see :func:`backends` for the names).

    Raises ``RuntimeError`` with an install hint when the backend is not available here.
    Inside the block, an op that the backend does not implement, or a tensor on a device the
    backend does not serve, raises rather than silently falling back.
    """
    backend = get_backend(name)
    if not backend.available:
        raise RuntimeError(
            f"backend {name!r} is not available: {backend.unavailable_reason}. {backend.install_hint}".strip()
        )
    previous = _local.forced
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = previous


def current_backend() -> str | None:
    """The backend forced by the innermost ``use_backend`` block, or None."""
    return _local.forced


def dispatch_state() -> tuple[int, str | None]:
    """What :func:`resolve`'s answer depends on besides the op and device type, in this thread:
    the kernel table's generation and the forced backend. A caller that keeps a resolved (or
    prepared) kernel may reuse it while this stays equal."""
    return _generation, _local.forced


def resolve(op: str, device: torch.device) -> Callable:
    """Return the kernel for ``op`` on ``device``: the forced backend, else the best available."""
    return resolve_entry(op, device).fn


def resolve_entry(op: str, device: torch.device) -> KernelEntry:
    """The :class:`KernelEntry` :func:`resolve` picks (its ``prepare`` too)."""
    _ensure_loaded()
    forced = current_backend()
    if forced is not None:
        entry = _registry[forced].entries.get(op)
        if entry is None:
            raise RuntimeError(f"backend {forced!r} has no kernel for op {op!r}")
        if entry.priority_for(device.type) is None:
            raise RuntimeError(f"backend {forced!r} does not serve {device.type} tensors (op {op})")
        return entry
    entry = _best.get((op, device.type))
    if entry is None:
        entry = _best[(op, device.type)] = _highest_priority(op, device.type)
    return entry


def _highest_priority(op: str, device_type: str) -> KernelEntry:
    best: KernelEntry | None = None
    for backend in _registry.values():
        entry = backend.entries.get(op)
        if entry is None or not backend.available:
            continue
        priority = entry.priority_for(device_type)
        if priority is not None and priority >= 0 and (best is None or priority > best.priority_for(device_type)):
            best = entry
    if best is None:
        raise RuntimeError(f"no kernel for op {op!r} on {device_type} tensors")
    return best


__all__ = [
    "Backend", "KernelEntry", "declare_backend", "backends", "backend_names", "get_backend", "use_backend",
    "current_backend", "resolve", "resolve_entry", "dispatch_state",
]
