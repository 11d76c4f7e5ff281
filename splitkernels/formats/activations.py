"""Section 3 of docs/FORMATS.md: the TS + TAB-Q rules that every codec backend shares, and the
fixed-capacity buffers the encode kernels write (one named type, :class:`EncodedBuffers`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .dtypes import exact_div

CODEC_BITS = tuple(range(1, 9))


def _bits16(h: torch.Tensor) -> torch.Tensor:
    return h.view(torch.int16).to(torch.int32) & 0xFFFF


def _from_bits16(bits: torch.Tensor) -> torch.Tensor:
    signed = torch.where(bits >= 0x8000, bits - 0x10000, bits)
    return signed.to(torch.int16).view(torch.float16).float()


def round_down_fp16(v: torch.Tensor) -> torch.Tensor:
    """Largest fp16 value <= v (fp32 in, fp32 out; -inf below the fp16 range).

    TAB-Q rounds ``lo`` down and ``step`` up to fp16 so the quantisation grid always covers the
    inlier range.
    """
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


def step_for(lo16: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """step_b = (hi - lo) / (2^b - 1) in fp32, rounded up to fp16 (inf where it does not fit)."""
    return round_up_fp16(exact_div(hi - lo16, 2**bits - 1))


def estimated_sq_error(step: torch.Tensor, n_inliers: torch.Tensor) -> torch.Tensor:
    """Expected squared error of uniform quantisation, n_in * step^2 / 12, in fp64."""
    s = step.double()
    return exact_div(n_inliers.double() * s * s, 12.0)


class EncodedBuffers(NamedTuple):
    """What ``ts_tabq_encode`` writes for ``x [T, d]`` with capacity ``C`` (a tuple, in this order).

    Row ``t`` of ``codes`` uses its first ``nbytes[t]`` bytes; ``idx``/``val`` use their first
    ``cnt[t]`` slots (unused slots hold index 0 and value 0). ``hi`` feeds the budget allocator
    and is not serialised.
    """

    bits: torch.Tensor  # u8 [T]: width per token, 1..8 or 16/32 = raw
    lo: torch.Tensor  # f16 [T]
    step: torch.Tensor  # f16 [T]
    hi: torch.Tensor  # f32 [T]
    cnt: torch.Tensor  # i32 [T]: outliers kept
    idx: torch.Tensor  # i32 [T, C]
    val: torch.Tensor  # x.dtype [T, C]
    codes: torch.Tensor  # u8 [T, d * itemsize]
    nbytes: torch.Tensor  # i32 [T]: bytes of codes used


def empty_encode_buffers(x: torch.Tensor, capacity: int) -> EncodedBuffers:
    """Uninitialised :class:`EncodedBuffers` for ``x [T, d]`` on x's device, shared by every backend."""
    t, d = x.shape
    dev = x.device
    return EncodedBuffers(
        bits=torch.empty(t, dtype=torch.uint8, device=dev),
        lo=torch.empty(t, dtype=torch.float16, device=dev),
        step=torch.empty(t, dtype=torch.float16, device=dev),
        hi=torch.empty(t, dtype=torch.float32, device=dev),
        cnt=torch.empty(t, dtype=torch.int32, device=dev),
        idx=torch.empty(t, capacity, dtype=torch.int32, device=dev),
        val=torch.empty(t, capacity, dtype=x.dtype, device=dev),
        codes=torch.empty(t, d * x.element_size(), dtype=torch.uint8, device=dev),
        nbytes=torch.empty(t, dtype=torch.int32, device=dev),
    )
