"""Low-bit weight x fp activation matmul (docs/FORMATS.md section 2), three paths chosen by M.

* ``gemv``: one program per (N tile, K split, token); dequantises a [BLOCK_N, BLOCK_K] tile in
  registers and reduces with FMAs (no tensor cores: at M = 1 the weight bytes are the cost).
* ``tiled``: [BLOCK_M, BLOCK_N] output tiles, the dequantised weight tile goes to ``tl.dot``.

Both load whole int32 words and unpack them with shifts when codes never straddle words or
groups (2/4/8 bits, group size a multiple of the codes per word); otherwise (3 bits, odd group
sizes) every code is fetched from its word(s) on its own.
* ``dequant``: the weight is dequantised once by a kernel (cached per weight, bounded by
  ``SPLITKERNELS_DEQUANT_CACHE_MB``) and ``torch.matmul`` takes over where compute dominates.

Split-K partial sums are added with fp32 atomics into a zeroed fp32 buffer. fp16 activations
use an fp16 ``tl.dot`` (weights rounded to fp16 after dequantisation, as the dense layer would
hold them); bf16 and fp32 keep the weight in fp32 (bf16 weights would lose too many bits).
"""
from __future__ import annotations

import os
import threading
import weakref

import torch
import triton
import triton.language as tl

from ..ops import reference as ref
from . import autotune_cache
from .rounding import to_bf16_bits
from .dispatch import choose_path


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


@triton.jit
def _dequant_kernel(qw_ptr, scale_ptr, zero_ptr, w_ptr, N, K, W, NG, GROUP,
                    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    w = _dequant(qw_ptr, scale_ptr, zero_ptr, n, k, N, K, W, NG, GROUP, BITS)
    tl.store(w_ptr + n.to(tl.int64) * K + k, w.to(w_ptr.dtype.element_ty), mask=(n < N) & (k < K))


# ---------------------------------------------------------------- launch configurations

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
TILED_CONFIGS = [
    {"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 4, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4, "num_warps": 4, "num_stages": 4},
]
_DEQUANT_BLOCK = (32, 128)


def _geometry(qweight: torch.Tensor, scale: torch.Tensor, k: int, group_size: int) -> tuple[int, ...]:
    n, words = qweight.shape
    return n, k, words, scale.shape[1], group_size


def word_tile(bits: int, group_size: int) -> bool:
    """Whether the kernels may load whole int32 words: codes never straddle words or groups."""
    return 32 % bits == 0 and group_size % (32 // bits) == 0


def gemv(x2, qweight, scale, zero, bits, group_size, bias, config: dict) -> torch.Tensor:
    """``x2 [M, K] @ W^T`` with the GEMV kernel and an explicit ``config`` (see GEMV_CONFIGS)."""
    m, k = x2.shape
    n, k, words, ng, g = _geometry(qweight, scale, k, group_size)
    split = config["SPLIT_K"]
    y = _output(m, n, x2, split)
    k_split = triton.cdiv(triton.cdiv(k, split), config["BLOCK_K"]) * config["BLOCK_K"]
    grid = (triton.cdiv(n, config["BLOCK_N"]), split, m)
    _gemv_kernel[grid](
        x2, qweight, scale, zero, bias if bias is not None else y, y, m, n, k, words, ng, g, k_split,
        BITS=bits, HAS_BIAS=bias is not None, SPLIT_K=split, OUT_BF16=y.dtype == torch.bfloat16,
        WORD_TILE=word_tile(bits, group_size), BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        num_warps=config["num_warps"],
    )
    return y.to(x2.dtype)


def tiled(x2, qweight, scale, zero, bits, group_size, bias, config: dict) -> torch.Tensor:
    """``x2 [M, K] @ W^T`` with the tiled kernel and an explicit ``config`` (see TILED_CONFIGS)."""
    m, k = x2.shape
    n, k, words, ng, g = _geometry(qweight, scale, k, group_size)
    split = config["SPLIT_K"]
    y = _output(m, n, x2, split)
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


def _output(m: int, n: int, x2: torch.Tensor, split: int) -> torch.Tensor:
    if split > 1:
        return torch.zeros(m, n, dtype=torch.float32, device=x2.device)
    return torch.empty(m, n, dtype=x2.dtype, device=x2.device)


def dequantize(qweight, scale, zero, bits, group_size, k, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight ``[N, K]`` in ``dtype``, computed in fp32 by a kernel."""
    n, k, words, ng, g = _geometry(qweight, scale, k, group_size)
    w = torch.empty(n, k, dtype=dtype, device=qweight.device)
    bn, bk = _DEQUANT_BLOCK
    _dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        qweight, scale, zero, w, n, k, words, ng, g, BITS=bits, BLOCK_N=bn, BLOCK_K=bk,
        enable_fp_fusion=False,  # the same two roundings as QuantizedWeight.dequantize
    )
    return w


# ---------------------------------------------------------------- dequantised-weight cache


class DequantCache:
    """Dense weights of the ``dequant`` path, one per packed weight, admitted while they fit a budget.

    No eviction: once the budget is full, further weights are dequantised on every call. For a
    model larger than the budget this keeps some layers hot, where least-recently-used order
    would cycle every layer through the cache, holding the memory and never hitting. An entry
    is valid while the packed tensors are the same objects at the same versions (an in-place
    update bumps ``_version``); it is dropped as soon as its ``qweight`` is freed.
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self._entries: dict[int, tuple] = {}
        # Re-entrant: a weakref callback may fire (and drop an entry) while the lock is held.
        self._lock = threading.RLock()

    def get(self, qweight, scale, zero, bits, group_size, k, dtype) -> torch.Tensor:
        """The dense weight for these packed tensors, from the cache or freshly dequantised."""
        key = id(qweight)
        stamp = (qweight._version, scale._version, zero._version, bits, group_size, k, dtype)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[1] == stamp and all(r() is t for r, t in zip(entry[0], (qweight, scale, zero))):
                return entry[2]
        w = dequantize(qweight, scale, zero, bits, group_size, k, dtype)
        size = w.numel() * w.element_size()
        refs = (weakref.ref(qweight, lambda _, key=key: self._drop(key)), weakref.ref(scale), weakref.ref(zero))
        with self._lock:
            self._drop(key)  # a stale entry of this weight
            if self.nbytes + size <= self.budget_bytes:
                self._entries[key] = (refs, stamp, w)
                self.nbytes += size
        return w

    def _drop(self, key: int) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self.nbytes -= entry[2].numel() * entry[2].element_size()

    def clear(self) -> None:
        """Forget every cached weight."""
        with self._lock:
            for key in list(self._entries):
                self._drop(key)


dequant_cache = DequantCache(int(os.environ.get("SPLITKERNELS_DEQUANT_CACHE_MB", "1024")) * 2**20)


# ---------------------------------------------------------------- entry point


def tuned_config(kernel: str, fn, candidates, x2, qweight, scale, zero, bits, group_size, bias) -> dict:
    """The launch config of ``fn`` (:func:`gemv` or :func:`tiled`) for this problem, tuned once per key."""
    m, k = x2.shape
    bucket = min(triton.next_power_of_2(m), 256)
    key = f"M{bucket}/N{qweight.shape[0]}/K{k}/b{bits}/g{group_size}/{str(x2.dtype).replace('torch.', '')}"
    return autotune_cache.pick(
        kernel, key, candidates, lambda cfg: fn(x2, qweight, scale, zero, bits, group_size, bias, cfg), x2.device
    )


def lowbit_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Triton kernel of :func:`splitkernels.ops.reference.lowbit_linear` (x contiguous, scale in x's dtype)."""
    k = x.shape[-1]
    n = qweight.shape[0]
    # No-ops for the usual contiguous tensors (so the dequant cache still sees the same objects).
    qweight, scale, zero = qweight.contiguous(), scale.contiguous(), zero.contiguous()
    bias = bias.contiguous() if bias is not None else None
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if m == 0 or n == 0 or k == 0:
        return ref.lowbit_linear(x, qweight, scale, zero, bits, group_size, bias)
    path = choose_path(m, bits, x.dtype, x.device)
    if path == "gemv":
        cfg = tuned_config("gemv", gemv, GEMV_CONFIGS, x2, qweight, scale, zero, bits, group_size, bias)
        y = gemv(x2, qweight, scale, zero, bits, group_size, bias, cfg)
    elif path == "tiled":
        cfg = tuned_config("tiled", tiled, TILED_CONFIGS, x2, qweight, scale, zero, bits, group_size, bias)
        y = tiled(x2, qweight, scale, zero, bits, group_size, bias, cfg)
    else:
        w = dequant_cache.get(qweight, scale, zero, bits, group_size, k, x.dtype)
        y = torch.nn.functional.linear(x2, w, bias)
    return y.reshape(*x.shape[:-1], n)
