"""Codec v2 dequantiser (docs/FORMATS.md §5.2, §5.5), one program per token row, plus the decode
launch sequence: :mod:`.codec_v2_count`, :mod:`.codec_v2_scan`, then this kernel (alone for a
frame of one token). Encode is :mod:`.codec_v2_quantise`.

``fp32(fp32((s - kmax) * step) + center)`` with floating-point contraction disabled (no FMA),
rounded to the output dtype to nearest even (bf16 from the fp32 bit pattern: the interpreter
truncates that cast); escapes and raw tokens are bit copies.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..codec.v2_device import HEADER_BYTES
from .codec_decode import row_warps
from .codec_v2_count import _count_kernel
from .codec_v2_quantise import BITS_DTYPE, block_d
from .codec_v2_scan import scan
from .rounding import to_bf16_bits

_OUT_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit(do_not_specialize=["d", "kmax", "n_escapes"])
def _dequantise_kernel(raw_ptr, sym_ptr, step_ptr, center_ptr, val_ptr, cnt_ptr, esc_off_ptr, raw_off_ptr, out_ptr,
                       d, kmax, n_escapes, OUT: tl.constexpr, ONE_TOKEN: tl.constexpr, BLOCK_D: tl.constexpr):
    # val_ptr and out_ptr are integer views of the output dtype (OUT: 0 fp32, 1 fp16, 2 bf16). ONE_TOKEN:
    # a frame of one token, launched without count and scan: its offsets are 0, its escapes n_escapes.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    inb = offs < d
    if tl.load(raw_ptr + row) != 0:
        src = n_escapes
        if not ONE_TOKEN:
            src += tl.load(raw_off_ptr + row) * d
        tl.store(out_ptr + row * d + offs, tl.load(val_ptr + src + offs, mask=inb), mask=inb)
    else:
        s = tl.load(sym_ptr + row * d + offs, mask=inb, other=0).to(tl.int32)
        step = tl.load(step_ptr + offs, mask=inb, other=0.0)
        center = tl.load(center_ptr + offs, mask=inb, other=0.0)
        y = (s - kmax).to(tl.float32) * step + center
        if OUT == 0:
            bits = y.to(tl.int32, bitcast=True)
        elif OUT == 1:
            bits = y.to(tl.float16).to(tl.int16, bitcast=True)
        else:
            bits = to_bf16_bits(y)
        if ONE_TOKEN:
            escapes = n_escapes
        else:
            escapes = tl.load(cnt_ptr + row)
        if escapes > 0:
            e = inb & (s == 2 * kmax + 1)
            ei = e.to(tl.int32)
            j = tl.cumsum(ei, axis=0) - ei
            if not ONE_TOKEN:
                j += tl.load(esc_off_ptr + row)
            # Never past the escapes (a missing value reads 0; the host checks the count first).
            bits = tl.where(e, tl.load(val_ptr + j, mask=e & (j < n_escapes), other=0), bits)
        tl.store(out_ptr + row * d + offs, bits, mask=inb)


def codec_v2_decode(packed: torch.Tensor, sym_off: int, val_off: int, n_escapes: int, step: torch.Tensor,
                    center: torch.Tensor, kmax: int, out: torch.Tensor) -> None:
    """Codec v2 dequantise of ``packed`` (:mod:`splitkernels.codec.v2_device`) into ``out [T >= 1, d]``."""
    t, d = out.shape
    bits = BITS_DTYPE[out.dtype]
    bd = block_d(d)
    header = packed[:HEADER_BYTES].view(torch.int64)
    raw = packed[HEADER_BYTES:HEADER_BYTES + t]
    sym = packed[sym_off:sym_off + t * d]
    one = t == 1  # the dequantiser alone (the header stands in for the scratch it does not read)
    if one:
        cnt = esc_off = raw_off = header
    else:
        scratch = torch.empty(4, t, dtype=torch.int64, device=out.device)
        _count_kernel[(t,)](sym, raw, scratch[0], d, kmax, BLOCK_D=bd, num_warps=row_warps(bd))
        scan(raw, scratch, header, with_nonfinite=False)
        cnt, esc_off, raw_off = scratch[0], scratch[2], scratch[3]
    _dequantise_kernel[(t,)](raw, sym, step, center, packed[val_off:].view(bits), cnt, esc_off, raw_off,
                             out.view(bits), d, kmax, n_escapes, OUT=_OUT_CODE[out.dtype], ONE_TOKEN=one, BLOCK_D=bd,
                             num_warps=row_warps(bd), enable_fp_fusion=False)
