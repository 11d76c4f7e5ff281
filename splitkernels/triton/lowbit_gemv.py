"""The ``gemv`` path of the low-bit matmul: one program per (N tile, K split, token) dequantises a
[BLOCK_N, BLOCK_K] tile in registers and reduces with FMAs (no tensor cores: at M = 1 the weight
bytes are the cost). Split-K partial sums are added with fp32 atomics into a zeroed fp32 buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lowbit_tiles import _dequant, _gemv_word_tile, _store_out, geometry, output_buffer, word_tile

# First entry = the default (used untuned, in the interpreter and in tests).
GEMV_CONFIGS = [
    {"BLOCK_N": 16, "BLOCK_K": 256, "SPLIT_K": 1, "num_warps": 4},
    {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 4},
    {"BLOCK_N": 8, "BLOCK_K": 512, "SPLIT_K": 1, "num_warps": 4},
    {"BLOCK_N": 16, "BLOCK_K": 256, "SPLIT_K": 2, "num_warps": 4},
    {"BLOCK_N": 16, "BLOCK_K": 256, "SPLIT_K": 4, "num_warps": 4},
    {"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 1, "num_warps": 8},
    {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 8},
]

@triton.jit(do_not_specialize=["M", "K_SPLIT"])
def _gemv_kernel(
    x_ptr, qw_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, N, K, W, NG, GROUP, K_SPLIT,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, OUT_BF16: tl.constexpr,
    WORD_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_begin = pid_k * K_SPLIT
    k_end = tl.minimum(k_begin + K_SPLIT, K)
    if WORD_TILE:
        acc3 = tl.zeros([BLOCK_N, BLOCK_K // (32 // BITS), 32 // BITS], tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            acc3 += _gemv_word_tile(qw_ptr, scale_ptr, zero_ptr, x_ptr + m * K, offs_n, k0, N, K, W, NG, GROUP,
                                    BITS, BLOCK_K)
        out = tl.sum(tl.sum(acc3, axis=2), axis=1)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + m * K + k, mask=k < K, other=0.0).to(tl.float32)
            w = _dequant(qw_ptr, scale_ptr, zero_ptr, offs_n[:, None], k[None, :], N, K, W, NG, GROUP, BITS)
            acc += w * xk[None, :]
        out = tl.sum(acc, axis=1)
    _store_out(y_ptr, out, m * N + offs_n, offs_n < N, bias_ptr, offs_n, pid_k, HAS_BIAS, SPLIT_K, OUT_BF16)


def gemv(x2, qweight, scale, zero, bits, group_size, bias, config: dict) -> torch.Tensor:
    """``x2 [M, K] @ W^T`` with the GEMV kernel and an explicit ``config`` (see GEMV_CONFIGS)."""
    m, k = x2.shape
    n, k, words, ng, g = geometry(qweight, scale, k, group_size)
    split = config["SPLIT_K"]
    y = output_buffer(m, n, x2, split)
    k_split = triton.cdiv(triton.cdiv(k, split), config["BLOCK_K"]) * config["BLOCK_K"]
    grid = (triton.cdiv(n, config["BLOCK_N"]), split, m)
    _gemv_kernel[grid](
        x2, qweight, scale, zero, bias if bias is not None else y, y, m, n, k, words, ng, g, k_split,
        BITS=bits, HAS_BIAS=bias is not None, SPLIT_K=split, OUT_BF16=y.dtype == torch.bfloat16,
        WORD_TILE=word_tile(bits, group_size), BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        num_warps=config["num_warps"],
    )
    return y.to(x2.dtype)
