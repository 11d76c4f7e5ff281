"""The ``tiled`` path of the low-bit matmul: [BLOCK_M, BLOCK_N] output tiles, the weight tile
dequantised in registers and fed to ``tl.dot`` (optional split-K with fp32 atomics). fp16
activations use an fp16 ``tl.dot`` (weights rounded to fp16 after dequantisation, as the dense layer
would hold them); bf16 and fp32 keep the weight in fp32 (bf16 weights would lose too many bits).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lowbit_tiles import _dequant, _dequant_word_tile_kn, _store_out, geometry, output_buffer, word_tile

# First entry = the default (used untuned, in the interpreter and in tests).
TILED_CONFIGS = [
    {"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 4, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4, "num_warps": 4, "num_stages": 4},
]

@triton.jit(do_not_specialize=["M", "K_SPLIT"])
def _tiled_kernel(
    x_ptr, qw_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, N, K, W, NG, GROUP, K_SPLIT,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, OUT_BF16: tl.constexpr,
    DOT_FP16: tl.constexpr, PRECISION: tl.constexpr, WORD_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_begin = pid_k * K_SPLIT
    for k0 in range(k_begin, tl.minimum(k_begin + K_SPLIT, K), BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * K + k[None, :],
                    mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0)
        if WORD_TILE:
            w = _dequant_word_tile_kn(qw_ptr, scale_ptr, zero_ptr, offs_n, k0, N, W, NG, GROUP, BITS, BLOCK_K, BLOCK_N)
        else:
            w = _dequant(qw_ptr, scale_ptr, zero_ptr, offs_n[None, :], k[:, None], N, K, W, NG, GROUP, BITS)
        if DOT_FP16:
            acc = tl.dot(a, w.to(tl.float16), acc)
        else:
            acc = tl.dot(a.to(tl.float32), w, acc, input_precision=PRECISION)
    offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    _store_out(y_ptr, acc, offs, mask, bias_ptr, offs_n[None, :], pid_k, HAS_BIAS, SPLIT_K, OUT_BF16)


def tiled(x2, qweight, scale, zero, bits, group_size, bias, config: dict) -> torch.Tensor:
    """``x2 [M, K] @ W^T`` with the tiled kernel and an explicit ``config`` (see TILED_CONFIGS)."""
    m, k = x2.shape
    n, k, words, ng, g = geometry(qweight, scale, k, group_size)
    split = config["SPLIT_K"]
    y = output_buffer(m, n, x2, split)
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    k_split = triton.cdiv(triton.cdiv(k, split), config["BLOCK_K"]) * config["BLOCK_K"]
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, config["BLOCK_N"]), split)
    _tiled_kernel[grid](
        x2, qweight, scale, zero, bias if bias is not None else y, y, m, n, k, words, ng, g, k_split,
        BITS=bits, HAS_BIAS=bias is not None, SPLIT_K=split, OUT_BF16=y.dtype == torch.bfloat16,
        DOT_FP16=x2.dtype == torch.float16,
        # tf32 keeps 10 mantissa bits of the fp32 weight (bf16 would keep 7); fp32 needs full precision.
        PRECISION="tf32" if x2.dtype == torch.bfloat16 else "ieee", WORD_TILE=word_tile(bits, group_size),
        BLOCK_M=block_m, BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return y.to(x2.dtype)
