"""Codec v2 escape gather (docs/FORMATS.md §5.5), one program per token row: the escaped values of a
coded token to its place in the packed buffer (channel order), a raw token's whole row after
all escapes. Exact copies of the element bits. Launched by :mod:`.codec_v2_quantise`.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["d", "kmax"])
def _gather_kernel(x_ptr, raw_ptr, sym_ptr, cnt_ptr, esc_off_ptr, raw_off_ptr, header_ptr, val_ptr, d, kmax,
                   BLOCK_D: tl.constexpr):
    # x_ptr and val_ptr are integer views of the input dtype: bit copies.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    inb = offs < d
    if tl.load(raw_ptr + row) != 0:
        dst = tl.load(header_ptr) + tl.load(raw_off_ptr + row) * d
        tl.store(val_ptr + dst + offs, tl.load(x_ptr + row * d + offs, mask=inb), mask=inb)
    elif tl.load(cnt_ptr + row) > 0:
        s = tl.load(sym_ptr + row * d + offs, mask=inb, other=0).to(tl.int32)
        e = inb & (s == 2 * kmax + 1)
        ei = e.to(tl.int32)
        rank = tl.cumsum(ei, axis=0) - ei
        dst = tl.load(esc_off_ptr + row) + rank
        tl.store(val_ptr + dst, tl.load(x_ptr + row * d + offs, mask=e), mask=e)
