"""Device descriptions (memory, bandwidth, peak compute) shipped as data, each with its source."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources

ROLES = ("edge", "server")
GIB = 2**30


@dataclass(frozen=True)
class Device:
    """One machine class for the roofline model.

    ``bandwidth_gbs`` is peak memory bandwidth in GB/s (1e9 bytes), ``peak_tflops`` dense fp16
    FLOP/s in 1e12; the efficiencies are the reachable fractions of those peaks.
    """

    name: str
    role: str
    memory_gib: float
    bandwidth_gbs: float
    peak_tflops: float
    bandwidth_efficiency: float = 0.7
    compute_efficiency: float = 0.5
    layer_overhead_us: float = 0.0
    codec_overhead_us: float = 0.0
    reserved_gib: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        for name in ("memory_gib", "bandwidth_gbs", "peak_tflops"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("bandwidth_efficiency", "compute_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        if not 0 <= self.reserved_gib < self.memory_gib:
            raise ValueError(f"reserved_gib must be in [0, memory_gib), got {self.reserved_gib!r}")

    @property
    def usable_bytes(self) -> int:
        """Memory left for the model after the OS/runtime reserve."""
        return int((self.memory_gib - self.reserved_gib) * GIB)

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_gbs * 1e9 * self.bandwidth_efficiency

    @property
    def flops_per_s(self) -> float:
        return self.peak_tflops * 1e12 * self.compute_efficiency

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Device:
        return cls(**d)


@lru_cache(maxsize=1)
def _catalogue() -> dict[str, Device]:
    data = json.loads(resources.files(__package__).joinpath("devices.json").read_text())
    return {name: Device(name=name, **spec) for name, spec in data["devices"].items()}


def devices(role: str | None = None) -> dict[str, Device]:
    """The shipped device classes by name, optionally only those of ``role`` ("edge"/"server")."""
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {ROLES} or None, got {role!r}")
    return {n: d for n, d in _catalogue().items() if role is None or d.role == role}


def get_device(name: str) -> Device:
    """The shipped device class ``name``; ValueError lists the known names."""
    cat = _catalogue()
    if name not in cat:
        raise ValueError(f"unknown device {name!r}; known: {sorted(cat)}")
    return cat[name]
