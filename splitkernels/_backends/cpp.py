"""The ``cpp`` backend: C++ CPU kernels from the torch-free extension ``splitkernels._C``.

The default backend for CPU tensors when the extension is built. This module is the torch
glue: it makes inputs contiguous, allocates outputs with ``torch.empty`` and hands data
pointers and sizes to the kernels (which release the GIL). Arguments arrive checked by the op
layer (:mod:`splitkernels.ops`); the kernels check the values they index with (widths, counts,
indices) and raise ValueError.

Agreement with :mod:`splitkernels.ops.reference`:

* ``pack_bits``, ``unpack_bits``, ``ts_tabq_encode``, ``ts_tabq_decode``: identical integers and
  bytes (codes, packed streams, indices, counts, widths, fp16 ``lo``/``step``, ``nbytes``) and
  identical decoded values. The codec's float64 sums of squares (for the rms threshold and
  the error budget) are added in a different order than torch's, which can only matter when
  a value lies within one float64 ulp of a decision boundary.
* ``int8_linear``: bit-identical to the reference (exact int32 accumulation, then the same fp32
  operations in the same order), for K < 133143 (larger K raises: an int32 sum could overflow), on
  every instruction set (``_C.lowbit_isa()`` picks the int8 kernels too: vpdpbusd on AVX-512 VNNI,
  vpmaddwd on AVX2 / AVX-512, plain loops otherwise).
* ``lowbit_linear``: kernels per instruction set, picked at run time (``_C.lowbit_isa()``).
  bf16 activations on AVX-512 BF16 CPUs (bits 2/4/8, groups of 4..32 bytes or of whole 64-byte
  chunks; on CPUs with AVX-512 VBMI too also bits 3, groups of 16/32/64 codes or of whole 128-code
  chunks: ``_C.lowbit_bf16_kernel``) multiply the exact integer codes with the bf16
  activations (vdpbf16ps) and apply each group's scale and zero to its sums
  (``s * sum(q*x) + z * sum(x)``), below 256 rows; from 256 rows on (prefill), where the
  per-group step would cost 7-16%, each 64-row block's panel holds W itself dequantised to bf16,
  as a dense bf16 ``F.linear`` holds it (no dense weight copy either way); on AMX tiles, where the
  per-group step costs more, from ``amx_scaled_min_rows`` (groups of 32: 8 rows, 64: 80, 128: 192,
  larger: 256). One or two bf16 or fp32 rows (fp32 rows, and fp16 rows as fp32, up to 12, 14 where K >= 768,
  20 where K >= 1024, on CPUs without AMX tiles) against 8-, 4- and 2-bit codes (and 3-bit codes with
  VBMI) in groups of whole 64-byte chunks
  (3 bits: 48 bytes; K too) or of a half, a quarter, ... of one down to 16 codes on AVX-512
  VNNI CPUs
  (``_C.lowbit_vnni``) go as three signed bytes of a per-group 22-bit fixed point
  (bf16 values of at least 2^-14 of their group's largest exact, others within 2^-23 of it; one fp32
  row with a group whose largest value passes 32 times its mean as four bytes of a 30-bit one, more
  such rows, and groups whose largest value lies below 2^-64, go on as below)
  against the codes as packed (vpdpbusd), with no decode (3-bit codes: spread into bytes); fp32 activations (and fp16,
  converted) use FMA kernels that do the same for M <= 6 and otherwise dequantise blocks of
  weight rows (``q*scale + zero``, one FMA) a slice of K at a time for a register-blocked GEMM
  micro-kernel that broadcasts each weight value against tiles of 8 activation rows. From
  ``BLAS_MIN_ROWS`` rows on, W is dequantised in row blocks for torch's matmul where that is
  faster: in fp32, for every activation dtype, where the kernels in use are below AVX-512
  (``_FP32_BLAS_ISAS``: their 8-lane GEMM trails torch's fp32 matmul there, and torch's bf16
  matmul has no bf16 instructions to use); in bf16 for bf16 activations the bf16 kernels do
  not take on AVX-512 CPUs, from ``_BF16_BLAS_MIN_ROWS`` rows on. All paths accumulate in fp32,
  so the result agrees with a float64 computation (``x.double() @ dequant(W).double().T``)
  within a relative Frobenius error of 1e-5 for fp32 activations, 2e-3 for fp16 and 2^-8 for
  bf16 activations (the output rounding); the bf16 kernels' scaled panels and the bf16 BLAS path
  also round the dequantised weight to bf16, like a dense bf16 ``F.linear``: 4e-3 (about 2.2e-3
  measured for random weights, against 1.6e-3 for the output rounding alone).
  Where torch's fp32 matmul precision allows bf16 (``torch.set_float32_matmul_precision("medium")``,
  :func:`fp32_matmul_allows_bf16`), fp32 activations take the bf16 kernels rounded to bf16, with
  fp32 sums and output: 4e-3, about twice as fast.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from .. import _native
from ..formats import DTYPE_CODE, dtype_code, empty_encode_buffers, packed_nbytes
from ..registry import declare_backend

_C, _reason = _native.load("_C")
_BACKEND = declare_backend("cpp", unavailable_reason=_reason, install_hint=_native.BUILD_HINT)
_kernel = _BACKEND.kernel
_CPU = {"cpu": 10}


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


@_kernel("pack_bits", _CPU)
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    codes = codes.contiguous()
    n = codes.shape[-1]
    out = torch.empty(*codes.shape[:-1], packed_nbytes(n, bits), dtype=torch.uint8)
    rows = codes.numel() // n if n else 0
    _C.pack_bits(_ptr(codes), rows, n, bits, _ptr(out))
    return out


@_kernel("unpack_bits", _CPU)
def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    packed = packed.contiguous()
    stride = packed.shape[-1]
    out = torch.empty(*packed.shape[:-1], n, dtype=torch.uint8)
    rows = packed.numel() // stride if stride else 0
    _C.unpack_bits(_ptr(packed), rows, stride, n, bits, _ptr(out))
    return out


@_kernel("ts_tabq_encode", _CPU)
def ts_tabq_encode(
    x: torch.Tensor,
    abs_threshold: bool,
    threshold: float,
    capacity: int,
    bit_choices: list[int],
    eps: float,
    forced_bits: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    x = x.contiguous()
    code = dtype_code("x", x)
    t, d = x.shape
    if forced_bits is not None:
        forced_bits = forced_bits.contiguous()
    out = empty_encode_buffers(x, capacity)
    if t:
        _C.ts_tabq_encode(
            _ptr(x), code, t, d, bool(abs_threshold), float(threshold), int(capacity), [int(b) for b in bit_choices],
            float(eps), _ptr(forced_bits), *(_ptr(buffer) for buffer in out),
        )
    return out


@_kernel("ts_tabq_decode", _CPU)
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
    code = dtype_code("val", val)
    t = bits.shape[0]
    # Per-token metadata is tiny; normalising its dtypes here keeps the kernel to one signature.
    bits32 = bits.contiguous().to(torch.int32)
    lo32 = lo.contiguous().float()
    step32 = step.contiguous().float()
    cnt32 = cnt.contiguous().to(torch.int32)
    idx32 = idx.contiguous().to(torch.int32)
    val = val.contiguous()
    codes = codes.contiguous()
    out = torch.empty(t, d, dtype=val.dtype)
    if t and d:
        _C.ts_tabq_decode(
            _ptr(bits32), _ptr(lo32), _ptr(step32), _ptr(cnt32), _ptr(idx32), _ptr(val), idx32.shape[1], _ptr(codes),
            codes.shape[1], t, d, code, _ptr(out),
        )
    return out


def _bias32(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.contiguous().float()


# Activation rows from which lowbit_linear may dequantise W and call torch's matmul instead of the
# kernels: in fp32, for every activation dtype, with the kernels in _FP32_BLAS_ISAS (BLAS_MIN_ROWS);
# in bf16, for bf16 activations whose layout the AVX-512 bf16 kernels (``_C.lowbit_bf16_kernel``)
# do not take (_BF16_BLAS_MIN_ROWS). With AVX-512 kernels fp32 and fp16 activations stay on the
# fp32 kernels at every M: their GEMM ran at 0.84-1.12 of torch's fp32 F.linear at M = 512, at or
# ahead of dequantising to fp32 for it (bench/results/ops, sessions 17-18).
BLAS_MIN_ROWS = 512
_BF16_BLAS_MIN_ROWS = 256
_DEQUANT_BLOCK_BYTES = 16 << 20  # the most bytes of a block of dequantised rows, so the temporary stays small
# Rows of a block are a multiple of this: torch's fp32 matmul (oneDNN) ran a 4681-row block of a
# 4864 x 896 weight at M = 512 slower than the whole weight (30.8 against 25.6 ms, two threads).
_DEQUANT_BLOCK_ALIGN = 64
# Kernels whose fp32 GEMM trails W dequantised to fp32 and torch's fp32 matmul from
# BLAS_MIN_ROWS rows on. Zen 3 (AVX2), W4 and W8, against torch's fp32 F.linear in the same run
# (bench/results/ops/s41): at M = 256 the kernels took 0.94-1.10 of its time at one thread and
# 0.80-1.05 at two, the dequantised matmul 1.01-1.11 and 1.05-1.13; at M = 512 the kernels 1.06-1.14
# at one thread (0.92-1.12 at two), the dequantised matmul 1.01-1.06 (1.01-1.09). Their bf16
# activations took torch's bf16 matmul before, which has no bf16 instructions there: 1560 ms at
# 4096 x 4096, M = 512.
_FP32_BLAS_ISAS = frozenset({"generic", "avx2"})
# torch's fp32 matmul precisions that allow bf16 products: oneDNN's setting (torch >= 2.9: "bf16"
# after torch.set_float32_matmul_precision("medium") or torch.backends.fp32_precision = "bf16"), or
# before that the legacy torch.get_float32_matmul_precision().
_BF16_PRECISIONS = ("bf16", "medium")


def _onednn_precision_getter() -> Callable[[], str] | None:
    """What ``torch.backends.mkldnn.matmul.fp32_precision`` reads (torch >= 2.9), called directly:
    0.2 us a call where the attribute takes 1 us (the op asks on every fp32 call); None before."""
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    try:
        getter("mkldnn", "matmul")
    except Exception:  # absent (None is not callable) or of another signature
        return None
    return functools.partial(getter, "mkldnn", "matmul")


_onednn_fp32_precision = _onednn_precision_getter()


def fp32_matmul_allows_bf16() -> bool:
    """Whether torch's fp32 matmul precision lets fp32 activations be multiplied as bf16."""
    if _onednn_fp32_precision is not None:
        return _onednn_fp32_precision() in _BF16_PRECISIONS
    return torch.get_float32_matmul_precision() in _BF16_PRECISIONS


def _dequant_matmul(
    x2d: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scale_code: int, bits: int,
    group_size: int, bias: torch.Tensor | None, y: torch.Tensor, wdtype: torch.dtype,
) -> None:
    """y [M, N] = x2d @ dequant(W)^T + bias, W dequantised to ``wdtype`` (fp32 or bf16) block by
    block of rows and multiplied by torch's matmul in that dtype (x2d converted to it)."""
    n, k = qweight.shape[0], x2d.shape[1]
    blocks = -(-n * k * wdtype.itemsize // _DEQUANT_BLOCK_BYTES)
    rows = -(-n // blocks)  # equal blocks,
    rows = min(n, -(-rows // _DEQUANT_BLOCK_ALIGN) * _DEQUANT_BLOCK_ALIGN)  # of whole panels
    w = torch.empty(rows, k, dtype=wdtype)
    xw = x2d.to(wdtype)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        wb = w[: n1 - n0]
        _C.lowbit_dequantize(
            _ptr(qweight[n0:n1]), n1 - n0, qweight.shape[1], k, _ptr(scale[n0:n1]), _ptr(zero[n0:n1]), scale_code,
            bits, group_size, _ptr(wb), DTYPE_CODE[wdtype],
        )
        # One block of y's own dtype is written in place; else each block's product is copied in.
        out = y if n1 - n0 == n and y.dtype == wdtype else None
        if bias is None:
            part = torch.mm(xw, wb.T, out=out)
        else:
            part = torch.addmm(bias[n0:n1].to(wdtype), xw, wb.T, out=out)
        if out is None:
            y[:, n0:n1] = part


def prepare_lowbit_linear(
    qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """``(x, bias) -> y`` for one weight (x contiguous), its pointers, sizes and scale dtype code read once.

    The op layer keeps the result while the weight keeps its storage, shape, strides and dtype
    (:mod:`splitkernels.ops.weight_plan`); values may change between calls. A non-contiguous
    weight is made contiguous on every call, as nothing here may hold a copy of its values.
    """
    if not (qweight.is_contiguous() and scale.is_contiguous() and zero.is_contiguous()):
        return lambda x, bias: prepare_lowbit_linear(
            qweight.contiguous(), scale.contiguous(), zero.contiguous(), bits, group_size)(x, bias)
    n, words = qweight.shape
    qp, sp, zp = _ptr(qweight), _ptr(scale), _ptr(zero)
    scale_code = dtype_code("scale", scale)
    linear, bf16_kernel, isa = _C.lowbit_linear, _C.lowbit_bf16_kernel, _C.lowbit_isa
    bf16_code = DTYPE_CODE[torch.bfloat16]

    def call(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x and bias come checked (the op layer): x contiguous in a float dtype, x.shape[-1] == K >= 1.
        dtype = x.dtype
        code = DTYPE_CODE[dtype]
        shape = x.shape
        k = shape[-1]
        if len(shape) == 2:  # x.new_empty(m, n): 1.2 us, torch.empty(m, n, dtype=...) 1.4, a shape tuple 1.8-2.1
            m = shape[0]
            y = x.new_empty(m, n)
        else:
            m = x.numel() // k
            y = torch.empty(size=(*shape[:-1], n), dtype=dtype)
        bias32 = _bias32(bias)
        # The instruction set (and so the bf16 kernels' reach) may change between calls: asked each time.
        # fp32 rows go to them, rounded to bf16, where torch's precision allows it (one row too: its
        # exact three-part path took twice as long, W4 at 4096 x 4096 1.42 against 0.73 ms).
        as_bf16 = (dtype is torch.float32 and bf16_kernel(bf16_code, bits, group_size) and fp32_matmul_allows_bf16())
        blas = None
        if m >= min(BLAS_MIN_ROWS, _BF16_BLAS_MIN_ROWS) and n and not as_bf16:
            if isa() in _FP32_BLAS_ISAS:
                if m >= BLAS_MIN_ROWS:
                    blas = torch.float32
            elif m >= _BF16_BLAS_MIN_ROWS and dtype is torch.bfloat16 and not bf16_kernel(code, bits, group_size):
                blas = torch.bfloat16
        if blas is not None:
            _dequant_matmul(x.view(m, k), qweight, scale, zero, scale_code, bits, group_size, bias32, y.view(m, n), blas)
        elif m and n:
            # Every tensor here is non-empty (k, n >= 1 and m >= 1), so data_ptr() is the pointer.
            linear(x.data_ptr(), code, m, k, qp, n, words, sp, zp, scale_code, bits, group_size,
                   0 if bias32 is None else bias32.data_ptr(), y.data_ptr(), as_bf16)
        return y

    return call


@_kernel("lowbit_linear", _CPU, prepare=prepare_lowbit_linear)
def lowbit_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return prepare_lowbit_linear(qweight, scale, zero, bits, group_size)(x.contiguous(), bias)


@_kernel("int8_linear", _CPU)
def int8_linear(
    x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    x = x.contiguous()
    code = dtype_code("x", x)
    w_int8 = w_int8.contiguous()
    w_scale = w_scale.contiguous().float()
    n, k = w_int8.shape
    bias32 = _bias32(bias)
    m = math.prod(x.shape[:-1])
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    if m and n:
        _C.int8_linear(_ptr(x), code, m, k, _ptr(w_int8), n, _ptr(w_scale), _ptr(bias32), _ptr(y))
    return y
