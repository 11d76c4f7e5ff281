"""Device functions shared by the low-bit matmul kernels (docs/FORMATS.md section 2): weight tiles
dequantised in registers from the packed int32 words, and the output store (bias, split-K atomics,
bf16 rounding). Kernels live one per file: lowbit_gemv.py, lowbit_tiled.py, lowbit_dequant.py.

Whole int32 words are loaded and unpacked with shifts when codes never straddle words or groups
(2/4/8 bits, group size a multiple of the codes per word, see :func:`word_tile`); otherwise (3 bits,
odd group sizes) :func:`_dequant` fetches every code from its word(s) on its own.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import to_bf16_bits


def word_tile(bits: int, group_size: int) -> bool:
    """Whether the kernels may load whole int32 words: codes never straddle words or groups."""
    return 32 % bits == 0 and group_size % (32 // bits) == 0


def geometry(qweight: torch.Tensor, scale: torch.Tensor, k: int, group_size: int) -> tuple[int, ...]:
    """``(N, K, words per row, groups per row, group size)`` of a packed weight."""
    n, words = qweight.shape
    return n, k, words, scale.shape[1], group_size


def output_buffer(m: int, n: int, x2: torch.Tensor, split: int) -> torch.Tensor:
    """``y [m, n]``: zeroed fp32 for split-K atomics, else uninitialised in x's dtype."""
    if split > 1:
        return torch.zeros(m, n, dtype=torch.float32, device=x2.device)
    return torch.empty(m, n, dtype=x2.dtype, device=x2.device)


@triton.jit
def _dequant(qw_ptr, scale_ptr, zero_ptr, n, k, N, K, W, NG, GROUP, BITS: tl.constexpr):
    """fp32 weights ``w[n, k]`` for broadcastable index tensors ``n``, ``k`` (0 outside [N, K])."""
    mask = (n < N) & (k < K)
    bit = k * BITS
    word = bit >> 5
    sh = (bit & 31).to(tl.uint32)
    row = qw_ptr + n.to(tl.int64) * W
    code = tl.load(row + word, mask=mask, other=0).to(tl.uint32, bitcast=True) >> sh
    if 32 % BITS != 0:
        # Widths that do not divide 32 (3 bits) let a code straddle two words.
        spill = mask & (sh + BITS > 32)
        hi = tl.load(row + word + 1, mask=spill, other=0).to(tl.uint32, bitcast=True)
        code = code | (hi << ((32 - sh) & 31))
    code = code & ((1 << BITS) - 1)
    g = n.to(tl.int64) * NG + k // GROUP
    s = tl.load(scale_ptr + g, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + g, mask=mask, other=0.0).to(tl.float32)
    return code.to(tl.float32) * s + z


@triton.jit
def _store_out(y_ptr, acc, offs, mask, bias_ptr, bias_offs, pid_k, HAS_BIAS: tl.constexpr,
               SPLIT_K: tl.constexpr, OUT_BF16: tl.constexpr):
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + bias_offs, mask=mask, other=0.0).to(tl.float32)
    if SPLIT_K > 1:
        tl.atomic_add(y_ptr + offs, acc, mask=mask)
    elif OUT_BF16:
        tl.store(y_ptr.to(tl.pointer_type(tl.int16)) + offs, to_bf16_bits(acc), mask=mask)
    else:
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_word_tile(qw_ptr, scale_ptr, zero_ptr, x_row, offs_n, k0, N, K, W, NG, GROUP,
                    BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, words, codes per word] products w * x for widths dividing 32, loading whole words."""
    CPW: tl.constexpr = 32 // BITS
    wi = k0 // CPW + tl.arange(0, BLOCK_K // CPW)
    j = tl.arange(0, CPW)
    k = wi[:, None] * CPW + j[None, :]
    xk = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
    mask = (offs_n[:, None] < N) & (wi[None, :] < W)
    n64 = offs_n[:, None].to(tl.int64)
    words = tl.load(qw_ptr + n64 * W + wi[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
    codes = (words[:, :, None] >> (j * BITS).to(tl.uint32)[None, None, :]) & ((1 << BITS) - 1)
    # The group size is a multiple of the codes per word, so one scale serves a whole word.
    g = n64 * NG + (wi * CPW // GROUP)[None, :]
    s = tl.load(scale_ptr + g, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + g, mask=mask, other=0.0).to(tl.float32)
    return (codes.to(tl.float32) * s[:, :, None] + z[:, :, None]) * xk[None, :, :]


@triton.jit
def _dequant_word_tile_kn(qw_ptr, scale_ptr, zero_ptr, offs_n, k0, N, W, NG, GROUP,
                          BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 weights as a [BLOCK_K, BLOCK_N] tile from whole int32 words (widths dividing 32)."""
    CPW: tl.constexpr = 32 // BITS
    wi = k0 // CPW + tl.arange(0, BLOCK_K // CPW)
    j = tl.arange(0, CPW)
    mask = (wi[:, None] < W) & (offs_n[None, :] < N)
    n64 = offs_n[None, :].to(tl.int64)
    words = tl.load(qw_ptr + n64 * W + wi[:, None], mask=mask, other=0).to(tl.uint32, bitcast=True)
    codes = (words[:, None, :] >> (j * BITS).to(tl.uint32)[None, :, None]) & ((1 << BITS) - 1)
    g = n64 * NG + (wi * CPW // GROUP)[:, None]
    s = tl.load(scale_ptr + g, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + g, mask=mask, other=0.0).to(tl.float32)
    w = codes.to(tl.float32) * s[:, None, :] + z[:, None, :]
    return tl.reshape(w, [BLOCK_K, BLOCK_N])
