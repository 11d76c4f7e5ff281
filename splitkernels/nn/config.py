"""Quantisation settings as data: one frozen config type for layers, whole models and OPSC."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..formats import WEIGHT_BITS

PER_CHANNEL = -1
# "rtn": round each group to nearest (no data); "gptq": Hessian-based error feedback on
# calibration inputs (splitkernels.gptq). Both produce the same packed format.
METHODS = ("rtn", "gptq")
# Dtypes a config may store scales, zeros and bias in (by name, so configs stay JSON).
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class QuantConfig:
    """How to quantise a linear layer's weight (docs/FORMATS.md section 2).

    ``bits`` in {2, 3, 4, 8}; ``group_size`` a positive int or ``-1`` for one group per output
    channel (the whole input dimension K); ``clip_search`` shrinks each group's range to the
    least-squares best (helps at 2-3 bits, slower to quantise). ``method`` is ``"rtn"``
    (round to nearest, no data needed) or ``"gptq"`` (calibrated error feedback; needs
    calibration token ids, see :func:`splitkernels.calibration.quantize_layers`). A ``"gptq"``
    config always searches each group's range, weighted by its calibration Hessian
    (:func:`splitkernels.gptq.gptq_quantize`); ``clip_search`` only changes ``"rtn"``.
    ``scale_dtype`` (``"float32"``, ``"float16"`` or ``"bfloat16"``) stores each linear layer's
    scales, zeros and bias in that dtype (an OPSC-quantised input embedding keeps its table's, the
    dtype of its output); ``None`` keeps the weight's. ``"float16"`` in an fp32 model makes
    4-bit groups of 32 cost 5 bits a weight instead of 6 (llama.cpp's Q4_1): the native decode
    step at Llama-3-8B's layer shape ran 20-27% faster (bench/results/edge_decode/README.md).

    A group size that does not divide a layer's K is adapted per layer by
    :meth:`group_size_for`; the size actually used is recorded on each ``QuantLinear``.
    """

    bits: int = 4
    group_size: int = 128
    clip_search: bool = False
    method: str = "rtn"
    scale_dtype: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in WEIGHT_BITS:
            raise ValueError(f"bits must be one of {WEIGHT_BITS}, got {self.bits!r}")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or (g <= 0 and g != PER_CHANNEL):
            raise ValueError(f"group_size must be a positive int or -1 (per channel), got {g!r}")
        if not isinstance(self.clip_search, bool):
            raise TypeError(f"clip_search must be a bool, got {type(self.clip_search).__name__}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.scale_dtype is not None and self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be None or one of {tuple(SCALE_DTYPES)}, got {self.scale_dtype!r}")

    def scale_dtype_for(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype of a layer's scales, zeros and bias: ``scale_dtype``, else the weight's."""
        return weight_dtype if self.scale_dtype is None else SCALE_DTYPES[self.scale_dtype]

    def group_size_for(self, in_features: int) -> int:
        """The group size used for a layer with ``in_features`` inputs (K).

        The configured size when it divides K; ``K`` itself for ``-1`` or a size >= K; otherwise
        the largest divisor of K below the configured size that is a multiple of 8 (so groups
        stay aligned with whole bytes of codes), or K (per channel) when there is none: tiny odd
        groups would cost more in scales than they save in error.
        """
        g = self.group_size
        if g == PER_CHANNEL or g >= in_features:
            return in_features
        if in_features % g == 0:
            return g
        for d in range(g - g % 8, 0, -8):
            if in_features % d == 0:
                return d
        return in_features

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable); an RTN config leaves ``method`` out and one without a
        ``scale_dtype`` that key, so it reads exactly as it did before those fields existed."""
        data = asdict(self)
        if self.method == "rtn":
            del data["method"]
        if self.scale_dtype is None:
            del data["scale_dtype"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        """Inverse of :meth:`to_dict` (a dict without ``method`` means RTN, one without
        ``scale_dtype`` the weight's dtype); unknown keys raise ValueError naming them."""
        unknown = set(data) - {"bits", "group_size", "clip_search", "method", "scale_dtype"}
        if unknown:
            raise ValueError(f"unknown QuantConfig keys: {sorted(unknown)}")
        return cls(**data)

    def __str__(self) -> str:
        group = "per-channel" if self.group_size == PER_CHANNEL else f"g{self.group_size}"
        method = "" if self.method == "rtn" else f" {self.method}"
        scales = "" if self.scale_dtype is None else f" {self.scale_dtype} scales"
        return f"{self.bits}-bit {group}" + (" clip" if self.clip_search else "") + method + scales


def check_opsc_sides(front: QuantConfig | None, back: QuantConfig | None, quantize_embedding: bool) -> None:
    """The OPSC settings of any config that carries them: each side a QuantConfig or None, and a
    quantised embedding only with a front config. Raises TypeError/ValueError naming the field."""
    for name, value in (("front", front), ("back", back)):
        if value is not None and not isinstance(value, QuantConfig):
            raise TypeError(f"{name} must be a QuantConfig or None, got {type(value).__name__}")
    if not isinstance(quantize_embedding, bool):
        raise TypeError(f"quantize_embedding must be a bool, got {type(quantize_embedding).__name__}")
    if quantize_embedding and front is None:
        raise ValueError("quantize_embedding needs a front QuantConfig (front is None)")


@dataclass(frozen=True)
class OPSCConfig:
    """One-point split compression as data: decoder layers ``1..split_layer`` at ``front``, the
    rest at ``back`` (``None`` keeps a side dense); ``quantize_embedding`` also stores the input
    token table at ``front``. Applied by ``splitkernels.quantize_`` via :func:`splitkernels.opsc.apply_opsc`.
    """

    split_layer: int
    front: QuantConfig | None = None
    back: QuantConfig | None = None
    quantize_embedding: bool = False

    def __post_init__(self) -> None:
        s = self.split_layer
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"split_layer must be a non-negative int (number of front layers), got {s!r}")
        check_opsc_sides(self.front, self.back, self.quantize_embedding)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable); the sides are nested QuantConfig dicts or None."""
        return {
            "split_layer": self.split_layer,
            "front": None if self.front is None else self.front.to_dict(),
            "back": None if self.back is None else self.back.to_dict(),
            "quantize_embedding": self.quantize_embedding,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OPSCConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError naming them."""
        unknown = set(data) - {"split_layer", "front", "back", "quantize_embedding"}
        if unknown:
            raise ValueError(f"unknown OPSCConfig keys: {sorted(unknown)}")
        sides = {k: None if data.get(k) is None else QuantConfig.from_dict(data[k]) for k in ("front", "back")}
        return cls(data["split_layer"], quantize_embedding=data.get("quantize_embedding", False), **sides)
