"""Codec v2 escape count for decode (docs/FORMATS.md §5.5), one program per token row: escape
symbols of a coded token (0 for a raw one), the input of the scan. Launched by
:mod:`.codec_v2_dequantise`.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["d", "kmax"])
def _count_kernel(sym_ptr, raw_ptr, cnt_ptr, d, kmax, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    s = tl.load(sym_ptr + row * d + offs, mask=offs < d, other=0).to(tl.int32)
    n = tl.sum((s == 2 * kmax + 1).to(tl.int64), axis=0)
    tl.store(cnt_ptr + row, tl.where(tl.load(raw_ptr + row) != 0, 0, n))
