"""Directed rounding of fp32 values to fp16, the way every codec backend must do it.

TAB-Q rounds ``lo`` down and ``step`` up to fp16 so the quantisation grid always covers the
inlier range (docs/FORMATS.md). Results are fp32 tensors holding fp16-representable values
(or +-inf where the value does not fit fp16).
"""
import torch


def _bits16(h: torch.Tensor) -> torch.Tensor:
    return h.view(torch.int16).to(torch.int32) & 0xFFFF


def _from_bits16(bits: torch.Tensor) -> torch.Tensor:
    signed = torch.where(bits >= 0x8000, bits - 0x10000, bits)
    return signed.to(torch.int16).view(torch.float16).float()


def round_down_fp16(v: torch.Tensor) -> torch.Tensor:
    """Largest fp16 value <= v (fp32 in, fp32 out; -inf below the fp16 range)."""
    h = v.to(torch.float16)
    bits = _bits16(h)
    too_high = h.float() > v
    negative = bits >= 0x8000
    down = torch.where(negative, bits + 1, torch.where(bits == 0, torch.full_like(bits, 0x8001), bits - 1))
    return torch.where(too_high, _from_bits16(down), h.float())


def round_up_fp16(v: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 value >= v for v >= 0 (fp32 in, fp32 out; +inf above the fp16 range)."""
    h = v.to(torch.float16)
    too_low = h.float() < v
    return torch.where(too_low, _from_bits16(_bits16(h) + 1), h.float())
