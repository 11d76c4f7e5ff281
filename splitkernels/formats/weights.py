"""Section 2 of docs/FORMATS.md: group-wise packed low-bit weights and their state_dict.

``W [N, K]`` is stored as int32 words ``qweight [N, ceil(K*bits/32)]`` (each row one bit
stream, section 1) plus ``scale``/``zero [N, K/group_size]``; ``w^ = q * scale + zero``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .bitstream import pack_bits, unpack_bits
from .dtypes import FLOAT_DTYPES

WEIGHT_BITS = (2, 3, 4, 8)
WEIGHT_FORMAT_VERSION = 1
# 0-d int tensors that travel in every state_dict next to the packed tensors.
WEIGHT_META_KEYS = ("format_version", "bits", "group_size", "in_features")
WEIGHT_TENSOR_KEYS = ("qweight", "scale", "zero")


def packed_words(k: int, bits: int) -> int:
    """int32 words per packed weight row of ``k`` codes."""
    return (k * bits + 31) // 32


def _bytes_to_int32(stream: torch.Tensor) -> torch.Tensor:
    b = stream.to(torch.int64).unflatten(-1, (-1, 4))
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _int32_to_bytes(words: torch.Tensor) -> torch.Tensor:
    w = words.to(torch.int64) & 0xFFFFFFFF
    parts = [(w >> s) & 0xFF for s in (0, 8, 16, 24)]
    return torch.stack(parts, -1).flatten(-2).to(torch.uint8)


def pack_weight_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] -> int32 words [N, ceil(K*bits/32)] (the byte stream read as LE int32)."""
    stream = pack_bits(codes, bits)
    pad = packed_words(codes.shape[-1], bits) * 4 - stream.shape[-1]
    stream = torch.nn.functional.pad(stream, (0, pad))
    return _bytes_to_int32(stream)


def unpack_weight_codes(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """int32 words [N, W] -> uint8 codes [N, K]."""
    return unpack_bits(_int32_to_bytes(words), bits, k)


def dequantize_weight(
    qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int, k: int
) -> torch.Tensor:
    """w^ = q * scale + zero per group, in the dtype of ``scale``; shape [N, K]."""
    codes = unpack_weight_codes(qweight, bits, k).to(scale.dtype)
    codes = codes.unflatten(-1, (k // group_size, group_size))
    return (codes * scale.unsqueeze(-1) + zero.unsqueeze(-1)).flatten(-2)


def check_weight_layout(
    qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int, in_features: int
) -> None:
    """Raise TypeError/ValueError, naming the field, unless the tensors form a valid packed weight."""
    if isinstance(bits, bool) or bits not in WEIGHT_BITS:
        raise ValueError(f"bits must be one of {WEIGHT_BITS}, got {bits!r}")
    k = in_features
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"in_features must be a positive int, got {k!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or k % group_size:
        raise ValueError(f"group_size must be a positive divisor of in_features = {k}, got {group_size!r}")
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32 or qweight.dim() != 2:
        got = f"{qweight.dtype} of shape {tuple(qweight.shape)}" if isinstance(qweight, torch.Tensor) else type(qweight)
        raise TypeError(f"qweight must be a 2-D int32 tensor, got {got}")
    if qweight.shape[1] != packed_words(k, bits):
        raise ValueError(f"qweight must have {packed_words(k, bits)} words per row for K = {k} at {bits} bits, "
                         f"got {qweight.shape[1]}")
    shape = (qweight.shape[0], k // group_size)
    for name, t in (("scale", scale), ("zero", zero)):
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float32, float16 or bfloat16 tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (out_features, in_features / group_size), "
                             f"got {tuple(t.shape)}")
    if zero.dtype != scale.dtype:
        raise TypeError(f"zero must have the dtype of scale ({scale.dtype}), got {zero.dtype}")


@dataclass
class QuantizedWeight:
    """A packed low-bit weight ``W [N, K]``: ``w^ = q * scale + zero`` per group of ``group_size``.

    ``qweight`` is int32 ``[N, ceil(K*bits/32)]`` (each row one little-endian bit stream),
    ``scale``/``zero`` are ``[N, K/group_size]`` in the compute dtype.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight plus its scales and zeros."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.zero))

    def check(self) -> "QuantizedWeight":
        """Raise TypeError/ValueError naming the field unless the layout is valid; returns self."""
        check_weight_layout(self.qweight, self.scale, self.zero, self.bits, self.group_size, self.in_features)
        return self

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight ``[N, K]`` in ``dtype`` (default: the scale dtype)."""
        w = dequantize_weight(
            self.qweight, self.scale.float(), self.zero.float(), self.bits, self.group_size, self.in_features
        )
        return w.to(dtype or self.scale.dtype)

    def to(self, *args, **kwargs) -> "QuantizedWeight":
        """Move to a device and/or cast scale and zero to a float dtype (codes stay int32)."""
        scale = self.scale.to(*args, **kwargs)
        zero = self.zero.to(*args, **kwargs)
        return QuantizedWeight(
            self.qweight.to(scale.device), scale, zero, self.bits, self.group_size, self.in_features
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors plus format metadata (as 0-d int tensors, so safetensors can hold them)."""
        return {
            "qweight": self.qweight,
            "scale": self.scale,
            "zero": self.zero,
            "format_version": torch.tensor(WEIGHT_FORMAT_VERSION),
            "bits": torch.tensor(self.bits),
            "group_size": torch.tensor(self.group_size),
            "in_features": torch.tensor(self.in_features),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "QuantizedWeight":
        """Inverse of :meth:`state_dict`; raises ValueError on a format version this code cannot read."""
        version = int(state["format_version"])
        if version != WEIGHT_FORMAT_VERSION:
            raise ValueError(
                f"packed weight format_version {version} is not supported (this splitkernels reads "
                f"version {WEIGHT_FORMAT_VERSION})"
            )
        return cls(
            state["qweight"], state["scale"], state["zero"], int(state["bits"]), int(state["group_size"]),
            int(state["in_features"]),
        )
