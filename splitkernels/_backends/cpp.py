"""The ``cpp`` backend: OpenMP C++ kernels from the torch-free extension ``splitkernels._C``.

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
  operations in the same order), for K < 133143 (larger K raises: an int32 sum could overflow).
* ``lowbit_linear``: for M <= 4 activation rows the codes feed the FMAs directly and each
  group's scale and zero are applied to its partial sums (``s * sum(q*x) + z * sum(x)``); for
  larger M weight rows are dequantised like the reference (``q*scale + zero``) and dotted.
  Both accumulate in fp32 in their own order, so the result agrees with a float64
  computation (``x.double() @ dequant(W).double().T``) within a relative Frobenius error of
  1e-5 for fp32 activations and 2e-3 for fp16/bf16 activations (mostly the output rounding).
"""
from __future__ import annotations

import math

import torch

from .. import _native
from ..formats import dtype_code, empty_encode_buffers, packed_nbytes
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


@_kernel("lowbit_linear", _CPU)
def lowbit_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    x = x.contiguous()
    code = dtype_code("x", x)
    qweight = qweight.contiguous()
    scale = scale.contiguous()
    zero = zero.contiguous()
    scale_code = dtype_code("scale", scale)
    k = x.shape[-1]
    n = qweight.shape[0]
    bias32 = _bias32(bias)
    m = math.prod(x.shape[:-1])
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    if m and n:
        _C.lowbit_linear(
            _ptr(x), code, m, k, _ptr(qweight), n, qweight.shape[1], _ptr(scale), _ptr(zero), scale_code, bits,
            group_size, _ptr(bias32), _ptr(y),
        )
    return y


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
