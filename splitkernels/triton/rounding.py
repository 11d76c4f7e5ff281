"""Exact rounding helpers shared by the Triton kernels (docs/FORMATS.md's arithmetic rules).

Written on fp32 bit patterns with core ops so the Triton interpreter and every GPU agree with
the reference bit for bit: fp16 directed rounding (TAB-Q's ``lo``/``step``), round half to even,
and fp32 -> bf16 rounding for outputs.
"""
import triton
import triton.language as tl

_FP16_MAX_BITS = tl.constexpr(0x477FE000)  # 65504.0 as fp32 bits
_FP16_MIN_SUBNORMAL_BITS = tl.constexpr(0x33800000)  # 2^-24 as fp32 bits
_FP32_INF_BITS = tl.constexpr(0x7F800000)


@triton.jit
def _fp16_grid(a):
    """(largest, smallest) fp16 magnitude (<=, >=) the non-negative fp32 with bits ``a``, as fp32 bits.

    Above the fp16 range the pair is (65504, inf).
    """
    # fp16 keeps 10 of fp32's 23 mantissa bits; below 2^-14 the fp16 spacing is fixed at 2^-24.
    e = (a >> 23) - 127
    nclear = 13 + tl.maximum(-14 - e, 0)
    ulp = 1 << tl.minimum(nclear, 23)
    floor = tl.where(nclear >= 24, 0, a & ~(ulp - 1))
    up = tl.where(nclear >= 24, _FP16_MIN_SUBNORMAL_BITS, floor + ulp)
    ceil = tl.where(floor == a, a, up)
    big = a > _FP16_MAX_BITS
    return tl.where(big, _FP16_MAX_BITS, floor), tl.where(big, _FP32_INF_BITS, ceil)


@triton.jit
def round_down_fp16(v):
    """Largest fp16 value <= fp32 ``v`` (as fp32; -inf below the fp16 range)."""
    u = v.to(tl.int32, bitcast=True)
    floor, ceil = _fp16_grid(u & 0x7FFFFFFF)
    return tl.where(u < 0, -ceil.to(tl.float32, bitcast=True), floor.to(tl.float32, bitcast=True))


@triton.jit
def round_up_fp16(v):
    """Smallest fp16 value >= fp32 ``v >= 0`` (as fp32; +inf above the fp16 range)."""
    return _fp16_grid(v.to(tl.int32, bitcast=True))[1].to(tl.float32, bitcast=True)


@triton.jit
def rint_half_even(y):
    """Round fp32 ``y >= 0`` to the nearest integer, ties to even (fp32 adds round that way)."""
    return tl.where(y < 8388608.0, (y + 8388608.0) - 8388608.0, y)


@triton.jit
def to_bf16_bits(v):
    """Finite fp32 ``v`` rounded to bf16 (nearest, ties to even) as int16 bits."""
    # Written out because the Triton interpreter truncates fp32 -> bf16 casts.
    u = v.to(tl.int32, bitcast=True)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.int16)
