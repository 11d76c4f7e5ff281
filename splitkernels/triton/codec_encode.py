"""Fused TS + TAB-Q encode (docs/FORMATS.md section 3), one program per token row; decode is
:mod:`.codec_decode`.

Every rounding step is written with core ops so the integer outputs match the reference bit
for bit: fp16 directed rounding on the fp32 bit pattern (:mod:`.rounding`), IEEE division via ``div_rn`` (the
default fp32 division on GPUs is approximate), round-half-even with the 2^23 trick, float64
for the threshold and the error budget, and floating-point contraction disabled so
``q * step + lo`` is not fused into an FMA. The whole row lives in registers. The outlier
selection (top-C by magnitude, ties to the lower channel) runs only when a row has more
candidates than capacity: a few surplus candidates are dropped one reduction each, more go
through a radix select over the fp32 bit patterns of ``|x|``.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from ..formats import empty_encode_buffers, raw_width
from .bitpack import pack_group_words, store_group_bytes
from .codec_decode import row_warps
from .rounding import rint_half_even, round_down_fp16, round_up_fp16

_INT64_MAX = tl.constexpr(0x7FFFFFFFFFFFFFFF)
# Up to this many surplus candidates are dropped one by one; beyond, a 31-round radix select.
_DROP_ROUNDS_MAX = tl.constexpr(8)


@triton.jit
def _step_for(lo, hi, b):
    return round_up_fp16(tl.math.div_rn(hi - lo, tl.cast((1 << b) - 1, tl.float32)))


@triton.jit
def _is_finite(v):
    return tl.abs(v) < float("inf")


# d and C vary per call; specialising them (e.g. d == 1 as a constant) would only add recompiles.
@triton.jit(do_not_specialize=["d", "C", "thr_bits", "eps2_bits", "menu"])
def _encode_kernel(
    x_ptr, forced_ptr, bits_ptr, lo_ptr, step_ptr, hi_ptr, cnt_ptr, idx_ptr, val_ptr, codes_ptr, nbytes_ptr,
    d, C, thr_bits, eps2_bits, menu,
    ABS_MODE: tl.constexpr, FORCED: tl.constexpr, RAW: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    inb = offs < d
    x = tl.load(x_ptr + row * d + offs, mask=inb, other=0.0)
    xf = x.to(tl.float32)
    ax32 = tl.abs(xf)
    ax = ax32.to(tl.float64)
    # Python floats reach the kernel as fp32; the fp64 parameters travel as their bit patterns.
    thr = tl.cast(thr_bits, tl.int64).to(tl.float64, bitcast=True)
    if ABS_MODE:
        tau = thr
    else:
        tau = thr * tl.sqrt(tl.sum(ax * ax, axis=0) / tl.cast(d, tl.float64))
    cand = inb & (ax > tau)

    chosen = cand
    excess = tl.sum(cand.to(tl.int32), axis=0) - C
    if excess > 0:
        if excess <= _DROP_ROUNDS_MAX:
            # Few too many (the usual case): drop the worst candidate, one reduction each;
            # worst = smallest |x|, and among equals the highest channel (ties keep the lower one).
            order = (ax32.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (d - 1 - offs).to(tl.int64)
            order = tl.where(cand, order, _INT64_MAX)
            for _ in range(0, excess):
                order = tl.where(order == tl.min(order, axis=0), _INT64_MAX, order)
            chosen = order != _INT64_MAX
        elif C == 0:
            chosen = cand & (offs < 0)
        else:
            # |x| >= 0, so its fp32 bits order like the values: find the C-th largest key bit by bit.
            key = ax32.to(tl.int32, bitcast=True)
            v = 0
            for bit in tl.static_range(30, -1, -1):
                trial = v | (1 << bit)
                n_ge = tl.sum((cand & (key >= trial)).to(tl.int32), axis=0)
                v = tl.where(n_ge >= C, trial, v)
            above = cand & (key > v)
            tie = cand & (key == v)
            tie_rank = tl.cumsum(tie.to(tl.int32), axis=0) - tie.to(tl.int32)
            chosen = above | (tie & (tie_rank < C - tl.sum(above.to(tl.int32), axis=0)))

    chosen_i = chosen.to(tl.int32)
    cnt = tl.sum(chosen_i, axis=0)
    slot = tl.cumsum(chosen_i, axis=0) - chosen_i
    tl.store(idx_ptr + row * C + slot, offs, mask=chosen)
    tl.store(val_ptr + row * C + slot, x, mask=chosen)
    slots = tl.arange(0, BLOCK_C)
    unused = (slots >= cnt) & (slots < C)
    tl.store(idx_ptr + row * C + slots, tl.zeros([BLOCK_C], tl.int32), mask=unused)
    tl.store(val_ptr + row * C + slots, tl.zeros([BLOCK_C], val_ptr.dtype.element_ty), mask=unused)

    inl = inb & ~chosen
    n_in = d - cnt
    lo32 = tl.min(tl.where(inl, xf, float("inf")), axis=0)
    hi = tl.max(tl.where(inl, xf, -float("inf")), axis=0)
    # Adding +0 turns a -0 extreme into +0 (FORMATS §3.3), whatever the reduction order.
    lo32 = tl.where(n_in > 0, lo32, 0.0) + 0.0
    hi = tl.where(n_in > 0, hi, 0.0) + 0.0
    lo = round_down_fp16(lo32)
    xin = tl.where(inl, xf, 0.0).to(tl.float64)
    budget = tl.cast(eps2_bits, tl.int64).to(tl.float64, bitcast=True) * tl.sum(xin * xin, axis=0)
    n_in64 = n_in.to(tl.float64)

    # Steps of every width 1..8 at once; the menu, the forced width and the fit test pick one.
    widths = tl.arange(0, 8) + 1
    steps = _step_for(lo, hi, widths)
    # lo is finite or -inf, and lo = -inf makes every step inf: finite steps imply a finite lo.
    fits = _is_finite(steps)
    if FORCED:
        b = tl.load(forced_ptr + row).to(tl.int32)
        b = tl.where(tl.max(tl.where(widths == b, fits, False).to(tl.int32), axis=0) > 0, b, RAW)
    else:
        s = steps.to(tl.float64)
        ok = fits & (((menu >> widths) & 1) == 1) & ((n_in64 * s * s / 12.0) <= budget)
        b = tl.min(tl.where(ok, widths, RAW), axis=0)
    is_raw = b == RAW
    row_bytes = d * (RAW // 8)
    out_row = codes_ptr + row * row_bytes
    if is_raw:
        raw_ptr = out_row.to(val_ptr.dtype)
        tl.store(raw_ptr + offs, tl.where(chosen, 0.0, x), mask=inb)
        nbytes = row_bytes
        lo_out = tl.zeros([], tl.float32)
        step_out = tl.zeros([], tl.float32)
    else:
        step = tl.max(tl.where(widths == b, steps, 0.0), axis=0)
        qmax = tl.cast((1 << b) - 1, tl.float32)
        y = tl.math.div_rn(xf - lo, tl.where(step > 0, step, 1.0))
        q = tl.minimum(rint_half_even(y), qmax)
        q = tl.where(inl, q, 0.0)
        q = tl.where(step > 0, q, 0.0).to(tl.int64)
        nbytes = (d * b + 7) // 8
        words = pack_group_words(tl.reshape(q, [BLOCK_D // 8, 8]), b)
        store_group_bytes(out_row, words, 0, b, nbytes, BLOCK_D // 8)
        tail = tl.arange(0, BLOCK_D * (RAW // 8))
        tl.store(out_row + tail, tl.zeros([BLOCK_D * (RAW // 8)], tl.uint8), mask=(tail >= nbytes) & (tail < row_bytes))
        lo_out = lo
        step_out = step

    tl.store(bits_ptr + row, b.to(tl.uint8))
    tl.store(lo_ptr + row, lo_out.to(tl.float16))
    tl.store(step_ptr + row, step_out.to(tl.float16))
    tl.store(hi_ptr + row, hi)
    tl.store(cnt_ptr + row, cnt)
    tl.store(nbytes_ptr + row, nbytes)


def _f64_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def ts_tabq_encode(
    x: torch.Tensor,
    abs_threshold: bool,
    threshold: float,
    capacity: int,
    bit_choices: list[int],
    eps: float,
    forced_bits: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """Triton kernel of :func:`splitkernels.ops.reference.ts_tabq_encode` (x contiguous [T, d], finite)."""
    t, d = x.shape
    raw = raw_width(x.dtype)
    outs = empty_encode_buffers(x, capacity)
    if t == 0:
        return outs
    block_d = max(8, triton.next_power_of_2(d))
    _encode_kernel[(t,)](
        x, forced_bits.contiguous() if forced_bits is not None else outs[0], *outs, d, capacity,
        _f64_bits(float(threshold)), _f64_bits(float(eps) * float(eps)), sum(1 << b for b in set(bit_choices)),
        ABS_MODE=bool(abs_threshold), FORCED=forced_bits is not None, RAW=raw,
        BLOCK_D=block_d, BLOCK_C=max(1, triton.next_power_of_2(capacity)),
        num_warps=row_warps(block_d), enable_fp_fusion=False,
    )
    return outs
