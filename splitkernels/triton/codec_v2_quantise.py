"""Codec v2 quantiser (docs/FORMATS.md §5.2, §5.5), one program per token row, plus the encode
launch sequence: quantise, then :mod:`.codec_v2_scan` and :mod:`.codec_v2_gather`; a frame of one
token in the one launch (the quantiser writes its header and values too). Decode is
:mod:`.codec_v2_dequantise`.

Bit-exact with the PyTorch reference and the C++ pass: ``v = (fp32(x) - center) * inv`` as two
IEEE operations (floating-point contraction disabled), round half to even by adding and
subtracting 1.5 * 2^23, bf16 widened from its bit pattern (the interpreter's bf16 support is
not trusted). The whole row lives in registers, as in :mod:`.codec_encode`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..codec.v2_device import HEADER_BYTES
from .codec_decode import row_warps
from .codec_v2_gather import _gather_kernel
from .codec_v2_scan import scan

# Integer views of each dtype: the escape and raw copies move bits.
BITS_DTYPE = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@triton.jit(do_not_specialize=["d", "kmax", "raw_limit"])
def _quantise_kernel(x_ptr, center_ptr, inv_ptr, raw_ptr, sym_ptr, cnt_ptr, bad_ptr, d, kmax, raw_limit,
                     xbits_ptr, header_ptr, val_ptr, X_BF16: tl.constexpr, ONE_TOKEN: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    inb = offs < d
    if X_BF16:  # x_ptr is an int16 view
        xb = tl.load(x_ptr + row * d + offs, mask=inb, other=0).to(tl.int32)
        xf = (xb << 16).to(tl.float32, bitcast=True)
    else:
        xf = tl.load(x_ptr + row * d + offs, mask=inb, other=0.0).to(tl.float32)
    bad = tl.sum((inb & ~(tl.abs(xf) < float("inf"))).to(tl.int64), axis=0)
    center = tl.load(center_ptr + offs, mask=inb, other=0.0)
    inv = tl.load(inv_ptr + offs, mask=inb, other=0.0)
    v = (xf - center) * inv
    esc = inb & ~(tl.abs(v) <= kmax.to(tl.float32))  # NaN escapes
    v = tl.where(esc, 0.0, v)
    q = ((v + 12582912.0) - 12582912.0).to(tl.int32) + kmax
    sym = tl.where(esc, 2 * kmax + 1, q)
    n_esc = tl.sum(esc.to(tl.int64), axis=0)
    is_raw = n_esc > raw_limit
    tl.store(sym_ptr + row * d + offs, tl.where(is_raw, 0, sym).to(tl.uint8), mask=inb)
    tl.store(raw_ptr + row, is_raw.to(tl.uint8))
    if ONE_TOKEN:  # a frame of one token: the scan's header and the gather here (its offsets are 0)
        tl.store(header_ptr, tl.where(is_raw, 0, n_esc))
        tl.store(header_ptr + 1, is_raw.to(tl.int64))
        tl.store(header_ptr + 2, bad)
        bits = tl.load(xbits_ptr + offs, mask=inb)  # xbits_ptr and val_ptr: integer views, bit copies
        # Masks from tl.where, not `inb & is_raw`: the interpreter rejects a scalar bool in a mask.
        tl.store(val_ptr + offs, bits, mask=offs < tl.where(is_raw, d, 0))  # a raw token's row
        ei = tl.where(is_raw, 0, esc.to(tl.int32))  # else its escapes, in channel order
        tl.store(val_ptr + tl.cumsum(ei, axis=0) - ei, bits, mask=ei != 0)
    else:
        tl.store(cnt_ptr + row, tl.where(is_raw, 0, n_esc))
        tl.store(bad_ptr + row, bad)


def block_d(d: int) -> int:
    """The row width a program holds: d rounded up to a power of two (at least 16)."""
    return max(16, triton.next_power_of_2(d))


def codec_v2_encode(x: torch.Tensor, center: torch.Tensor, inv_step: torch.Tensor, kmax: int, raw_limit: int,
                    packed: torch.Tensor, sym_off: int, val_off: int) -> None:
    """Codec v2 quantise of ``x [T >= 1, d]`` into ``packed`` (layout: :mod:`splitkernels.codec.v2_device`)."""
    t, d = x.shape
    bits = BITS_DTYPE[x.dtype]
    bd = block_d(d)
    header = packed[:HEADER_BYTES].view(torch.int64)
    raw = packed[HEADER_BYTES:HEADER_BYTES + t]
    sym = packed[sym_off:sym_off + t * d]
    values = packed[val_off:].view(bits)
    one = t == 1  # one launch: no per-token counts to scan (the header stands in for the scratch)
    scratch = None if one else torch.empty(4, t, dtype=torch.int64, device=x.device)
    cnt, bad = (header, header) if one else (scratch[0], scratch[1])
    x_bf16 = x.dtype == torch.bfloat16
    _quantise_kernel[(t,)](x.view(bits) if x_bf16 else x, center, inv_step, raw, sym, cnt, bad, d, kmax, raw_limit,
                           x.view(bits), header, values, X_BF16=x_bf16, ONE_TOKEN=one, BLOCK_D=bd,
                           num_warps=row_warps(bd), enable_fp_fusion=False)
    if one:
        return
    scan(raw, scratch, header, with_nonfinite=True)
    _gather_kernel[(t,)](x.view(bits), raw, sym, scratch[0], scratch[2], scratch[3], header, values, d, kmax,
                         BLOCK_D=bd, num_warps=row_warps(bd))
