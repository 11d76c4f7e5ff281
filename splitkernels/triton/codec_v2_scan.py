"""Codec v2 exclusive scan over the tokens (docs/FORMATS.md §5.5), one program: where each token's
escaped values and raw row go in the packed buffer, and the header totals. Shared by
:mod:`.codec_v2_quantise` (encode) and :mod:`.codec_v2_dequantise` (decode).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_T = 1024


@triton.jit(do_not_specialize=["t"])
def _scan_kernel(raw_ptr, cnt_ptr, bad_ptr, esc_off_ptr, raw_off_ptr, header_ptr, t,
                 HAS_BAD: tl.constexpr, BLOCK_T: tl.constexpr):
    offs = tl.arange(0, BLOCK_T)
    carry_esc = tl.full([], 0, tl.int64)
    carry_raw = tl.full([], 0, tl.int64)
    bad = tl.full([], 0, tl.int64)
    for base in range(0, t, BLOCK_T):
        idx = base + offs
        m = idx < t
        c = tl.load(cnt_ptr + idx, mask=m, other=0)
        r = tl.load(raw_ptr + idx, mask=m, other=0).to(tl.int64)
        tl.store(esc_off_ptr + idx, carry_esc + tl.cumsum(c, axis=0) - c, mask=m)
        tl.store(raw_off_ptr + idx, carry_raw + tl.cumsum(r, axis=0) - r, mask=m)
        carry_esc += tl.sum(c, axis=0)
        carry_raw += tl.sum(r, axis=0)
        if HAS_BAD:
            bad += tl.sum(tl.load(bad_ptr + idx, mask=m, other=0), axis=0)
    tl.store(header_ptr, carry_esc)
    tl.store(header_ptr + 1, carry_raw)
    tl.store(header_ptr + 2, bad)


def scan(raw: torch.Tensor, scratch: torch.Tensor, header: torch.Tensor, with_nonfinite: bool) -> None:
    """``scratch`` int64 [4, T] holds escape counts and non-finite counts in rows 0 and 1; rows 2
    and 3 get the exclusive sums of the escape counts and of ``raw`` (u8 [T]); ``header`` int64
    [>= 3] the totals (escapes, raw tokens, non-finite inputs when ``with_nonfinite``, else 0)."""
    t = raw.shape[0]
    _scan_kernel[(1,)](raw, scratch[0], scratch[1], scratch[2], scratch[3], header, t, HAS_BAD=with_nonfinite,
                       BLOCK_T=min(_BLOCK_T, max(16, triton.next_power_of_2(t))), num_warps=4)
