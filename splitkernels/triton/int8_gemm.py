"""W8A8 linear: per-token symmetric int8 activations x per-channel int8 weights, int32 accumulation.

Two kernels: one program per token quantises its row (absmax / 127 with IEEE division, round
half to even), then an int8 ``tl.dot`` tile kernel accumulates exactly in int32 and rescales.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import rint_half_even, to_bf16_bits


@triton.jit(do_not_specialize=["K"])
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    xf = tl.load(x_ptr + row * K + offs, mask=offs < K, other=0.0).to(tl.float32)
    s = tl.math.div_rn(tl.max(tl.abs(xf), axis=0), 127.0)
    s = tl.where(s > 0, s, 1.0)
    y = tl.math.div_rn(xf, s)
    q = tl.minimum(rint_half_even(tl.abs(y)), 127.0)
    q = tl.where(y < 0, -q, q)
    tl.store(q_ptr + row * K + offs, q.to(tl.int8), mask=offs < K)
    tl.store(s_ptr + row, s)


@triton.jit(do_not_specialize=["M"])
def _int8_mm_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr, M, N, K,
    HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(xq_ptr + offs_m[:, None].to(tl.int64) * K + k[None, :],
                    mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0)
        b = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * K + k[:, None],
                    mask=(offs_n[None, :] < N) & (k[:, None] < K), other=0)
        acc = tl.dot(a, b, acc)
    xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if OUT_BF16:
        tl.store(y_ptr.to(tl.pointer_type(tl.int16)) + offs, to_bf16_bits(y), mask=mask)
    else:
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def int8_linear(
    x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Triton kernel of :func:`splitkernels.ops.reference.int8_linear` (all inputs contiguous)."""
    shape = x.shape
    k = shape[-1]
    n = w_int8.shape[0]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*shape[:-1], n)
    xq = torch.empty(m, k, dtype=torch.int8, device=x.device)
    xs = torch.empty(m, dtype=torch.float32, device=x.device)
    block_k = max(16, triton.next_power_of_2(k))
    _quantize_rows_kernel[(m,)](x2, xq, xs, k, BLOCK_K=block_k, num_warps=max(1, min(16, block_k // 512)))
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64))
    _int8_mm_kernel[grid](
        xq, xs, w_int8, w_scale, bias.contiguous() if bias is not None else y, y, m, n, k,
        HAS_BIAS=bias is not None, OUT_BF16=x.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, num_warps=4,
    )
    return y.reshape(*shape[:-1], n)
