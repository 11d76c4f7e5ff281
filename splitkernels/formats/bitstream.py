"""Section 1 of docs/FORMATS.md: rows of ``b``-bit codes as little-endian bit streams.

The functions here are the definition in code (plain PyTorch, any device); the fast kernels
behind :func:`splitkernels.ops.pack_bits` must produce the same bytes.
"""
from __future__ import annotations

import torch

BIT_STREAM_WIDTHS = tuple(range(1, 9))


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes of a bit stream of ``n`` codes of ``bits`` bits."""
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes [..., n] into the little-endian bit stream [..., ceil(n*bits/8)]."""
    n = codes.shape[-1]
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int32)
    stream = (codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1  # [..., n, bits], low bit first
    stream = stream.flatten(-2)
    nbytes = packed_nbytes(n, bits)
    stream = torch.nn.functional.pad(stream, (0, nbytes * 8 - n * bits))
    weights = 1 << torch.arange(8, device=codes.device, dtype=torch.int32)
    return (stream.unflatten(-1, (nbytes, 8)) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 stream [..., >= ceil(n*bits/8)] -> codes [..., n]."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    stream = ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., : n * bits]
    weights = 1 << torch.arange(bits, device=packed.device, dtype=torch.int32)
    return (stream.unflatten(-1, (n, bits)) * weights).sum(-1).to(torch.uint8)
