"""Uniform bit-stream packing (docs/FORMATS.md section 1) for 1..8-bit codes.

Groups of 8 codes of ``b`` bits fill exactly ``b`` bytes, so both directions work on
``[groups, 8]`` tiles: pack ORs the 8 shifted codes into one 64-bit word and splits it into
bytes; unpack reads the (at most two) bytes a code touches.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats import packed_nbytes


@triton.jit
def pack_group_words(codes, BITS):
    """``codes`` int64 [G, 8] -> the little-endian stream bits of each group of 8 as int64 [G]."""
    shifts = tl.arange(0, 8).to(tl.int64) * BITS
    return tl.sum(codes << shifts[None, :], axis=1)


@triton.jit
def store_group_bytes(out_row_ptr, words, group0, BITS, nbytes, G: tl.constexpr):
    """Store byte ``i < BITS`` of ``words[g]`` at stream byte ``(group0 + g) * BITS + i`` (< nbytes)."""
    g = group0 + tl.arange(0, G)
    i = tl.arange(0, 8)
    byte = ((words[:, None] >> (i[None, :].to(tl.int64) * 8)) & 0xFF).to(tl.uint8)
    pos = g[:, None] * BITS + i[None, :]
    tl.store(out_row_ptr + pos, byte, mask=(i[None, :] < BITS) & (pos < nbytes))


@triton.jit
def load_codes(row_ptr, k, BITS, nbytes):
    """Codes number ``k`` (any int tensor) of ``BITS`` bits from the uint8 stream at ``row_ptr``."""
    bit = k * BITS
    byte = bit >> 3
    b0 = tl.load(row_ptr + byte, mask=byte < nbytes, other=0).to(tl.int32)
    b1 = tl.load(row_ptr + byte + 1, mask=byte + 1 < nbytes, other=0).to(tl.int32)
    return (((b1 << 8) | b0) >> (bit & 7)) & ((1 << BITS) - 1)


@triton.jit
def _pack_kernel(codes_ptr, out_ptr, n, nbytes, BITS: tl.constexpr, G: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    group0 = tl.program_id(1) * G
    k = (group0 + tl.arange(0, G))[:, None] * 8 + tl.arange(0, 8)[None, :]
    codes = tl.load(codes_ptr + row * n + k, mask=k < n, other=0).to(tl.int64)
    words = pack_group_words(codes, BITS)
    store_group_bytes(out_ptr + row * nbytes, words, group0, BITS, nbytes, G)


@triton.jit
def _unpack_kernel(packed_ptr, out_ptr, n, row_stride, nbytes, BITS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    codes = load_codes(packed_ptr + row * row_stride, k, BITS, nbytes)
    tl.store(out_ptr + row * n + k, codes.to(tl.uint8), mask=k < n)


_GROUPS_PER_PROGRAM = 128
_CODES_PER_PROGRAM = 1024


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Triton kernel of :func:`splitkernels.ops.reference.pack_bits` (codes contiguous, each < 2**bits)."""
    n = codes.shape[-1]
    nbytes = packed_nbytes(n, bits)
    out = torch.empty(*codes.shape[:-1], nbytes, dtype=torch.uint8, device=codes.device)
    if out.numel() == 0:
        return out
    rows = codes.numel() // n
    grid = (rows, triton.cdiv(triton.cdiv(n, 8), _GROUPS_PER_PROGRAM))
    _pack_kernel[grid](codes, out, n, nbytes, BITS=bits, G=_GROUPS_PER_PROGRAM)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Triton kernel of :func:`splitkernels.ops.reference.unpack_bits` (packed contiguous)."""
    out = torch.empty(*packed.shape[:-1], n, dtype=torch.uint8, device=packed.device)
    if out.numel() == 0:
        return out
    row_stride = packed.shape[-1]
    rows = out.numel() // n
    grid = (rows, triton.cdiv(n, _CODES_PER_PROGRAM))
    _unpack_kernel[grid](
        packed, out, n, row_stride, packed_nbytes(n, bits), BITS=bits, BLOCK=_CODES_PER_PROGRAM
    )
    return out
