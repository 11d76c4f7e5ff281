"""Fused TS + TAB-Q decode (docs/FORMATS.md section 3), one program per token row: codes to
``lo + q * step``, then the exact outliers written over their channels. Encode is :mod:`.codec_encode`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats import raw_width
from .bitpack import load_codes
from .rounding import to_bf16_bits


@triton.jit(do_not_specialize=["d", "C", "codes_stride", "codes_width"])
def _decode_kernel(
    bits_ptr, lo_ptr, step_ptr, cnt_ptr, idx_ptr, val_ptr, codes_ptr, out_ptr, d, C, codes_stride, codes_width,
    RAW: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    inb = offs < d
    b = tl.load(bits_ptr + row).to(tl.int32)
    in_row = codes_ptr + row * codes_stride
    out_row = out_ptr + row * d
    # Reads stay inside the row's codes_width bytes and writes inside the row, whatever the buffers hold.
    if b == RAW:
        v = tl.load(in_row.to(val_ptr.dtype) + offs, mask=inb & ((offs + 1) * (RAW // 8) <= codes_width))
        tl.store(out_row + offs, v, mask=inb)
    else:
        q = load_codes(in_row, offs, b, tl.minimum((d * b + 7) // 8, codes_width)).to(tl.float32)
        xq = q * tl.load(step_ptr + row).to(tl.float32)
        xh = xq + tl.load(lo_ptr + row).to(tl.float32)
        if OUT_BF16:
            tl.store(out_row.to(tl.pointer_type(tl.int16)) + offs, to_bf16_bits(xh), mask=inb)
        else:
            tl.store(out_row + offs, xh.to(out_ptr.dtype.element_ty), mask=inb)
    # Outliers overwrite decoded values written by other threads of this program.
    tl.debug_barrier()
    slots = tl.arange(0, BLOCK_C)
    used = slots < tl.minimum(tl.load(cnt_ptr + row), C)
    ix = tl.load(idx_ptr + row * C + slots, mask=used, other=0)
    v = tl.load(val_ptr + row * C + slots, mask=used)
    tl.store(out_row + ix, v, mask=used & (ix >= 0) & (ix < d))


def row_warps(block_d: int) -> int:
    """Warps for a program holding a whole row of ``block_d`` channels in registers."""
    return max(1, min(16, block_d // 512))


def ts_tabq_decode(
    bits: torch.Tensor,
    lo: torch.Tensor,
    step: torch.Tensor,
    cnt: torch.Tensor,
    idx: torch.Tensor,
    val: torch.Tensor,
    codes: torch.Tensor,
    d: int,
) -> torch.Tensor:
    """Triton kernel of :func:`splitkernels.ops.reference.ts_tabq_decode`."""
    t = bits.shape[0]
    out = torch.empty(t, d, dtype=val.dtype, device=codes.device)
    if out.numel() == 0:
        return out
    capacity = idx.shape[1]
    block_d = max(8, triton.next_power_of_2(d))
    codes = codes if codes.stride(-1) == 1 else codes.contiguous()
    width, elem = codes.shape[1], val.element_size()
    if codes.stride(0) % elem or codes.data_ptr() % elem:
        # Raw rows are loaded as whole elements at codes + row * stride: both must be element-aligned.
        aligned = torch.zeros(t, -(-width // elem) * elem, dtype=torch.uint8, device=codes.device)
        aligned[:, :width] = codes
        codes = aligned
    _decode_kernel[(t,)](
        bits.contiguous(), lo.contiguous(), step.contiguous(), cnt.contiguous(), idx.contiguous(), val.contiguous(),
        codes, out, d, capacity, codes.stride(0), width,
        RAW=raw_width(val.dtype), OUT_BF16=val.dtype == torch.bfloat16, BLOCK_D=block_d, BLOCK_C=max(1, triton.next_power_of_2(capacity)),
        num_warps=row_warps(block_d), enable_fp_fusion=False,
    )
    return out
