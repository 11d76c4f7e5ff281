"""Public ops: each op's schema and argument checks, written once.

Each op is a ``torch.library`` custom op (with a fake kernel, so ``torch.compile`` traces it)
whose kernel is chosen per call by :func:`splitkernels.registry.resolve`. The wrappers here
validate arguments; the kernels behind them (one module per backend under
``splitkernels/_backends/``) may assume valid input. A plain eager call skips the custom op's
dispatcher and calls the same kernel (:func:`_run`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from ..formats import (
    BIT_STREAM_WIDTHS,
    CODEC_BITS,
    DTYPE_CODE,
    WEIGHT_BITS,
    EncodedBuffers,
    QuantizedWeight,
    empty_encode_buffers,
    packed_nbytes,
    raw_width,
)
from ..registry import resolve
from . import reference
from .checks import FLOAT_DTYPES, check_choice, check_same_device, check_tensor
from .weight_plan import linear_plan


def _run(op, name: str, device: torch.device, *args):
    """``op(*args)``, or in a plain eager call the kernel :func:`resolve` picks for ``name`` on
    ``device``, which is all the op's body does: torch.library's dispatcher costs about 50 us a
    call, more than a decode-sized kernel. The op itself runs under ``torch.compile``/export
    tracing, on fake or meta tensors, and where autograd would record. ``device`` is every
    tensor argument's device (the callers check that first)."""
    if device.type == "meta" or torch.compiler.is_compiling():
        return op(*args)
    grad = torch.is_grad_enabled()
    for a in args:
        # type() first: the isinstance checks are the costly part of a plain call.
        if type(a) is not Tensor and isinstance(a, FakeTensor):
            return op(*args)
        if grad and isinstance(a, Tensor) and a.requires_grad:
            return op(*args)
    return resolve(name, device)(*args)


# ---------------------------------------------------------------- pack / unpack


@torch.library.custom_op("splitkernels::pack_bits", mutates_args=())
def _pack_bits(codes: Tensor, bits: int) -> Tensor:
    return resolve("pack_bits", codes.device)(codes, bits)


@_pack_bits.register_fake
def _(codes: Tensor, bits: int) -> Tensor:
    return codes.new_empty(*codes.shape[:-1], packed_nbytes(codes.shape[-1], bits))


@torch.library.custom_op("splitkernels::unpack_bits", mutates_args=())
def _unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    return resolve("unpack_bits", packed.device)(packed, bits, n)


@_unpack_bits.register_fake
def _(packed: Tensor, bits: int, n: int) -> Tensor:
    return packed.new_empty(*packed.shape[:-1], n)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes ``[..., n]`` (each < 2**bits) into the bit stream ``[..., ceil(n*bits/8)]``.

    Code ``k`` occupies stream bits ``[k*bits, (k+1)*bits)``; stream bit ``i`` is bit ``i % 8``
    of byte ``i // 8`` (docs/FORMATS.md). Codes with bits above ``bits`` raise ValueError.
    """
    check_tensor("codes", codes, (torch.uint8,), min_ndim=1)
    check_choice("bits", bits, BIT_STREAM_WIDTHS)
    if codes.numel() and bits < 8 and int(codes.max()) >= (1 << bits):
        raise ValueError(f"codes must be < 2**bits = {1 << bits}, got a code {int(codes.max())}")
    return _run(_pack_bits, "pack_bits", codes.device, codes.contiguous(), bits)


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Unpack ``n`` codes of ``bits`` bits from each row of the uint8 bit stream ``packed``."""
    check_tensor("packed", packed, (torch.uint8,), min_ndim=1)
    check_choice("bits", bits, BIT_STREAM_WIDTHS)
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    need = packed_nbytes(n, bits)
    if packed.shape[-1] < need:
        raise ValueError(f"packed has {packed.shape[-1]} bytes per row, {n} codes of {bits} bits need {need}")
    return _run(_unpack_bits, "unpack_bits", packed.device, packed.contiguous(), bits, n)


# ---------------------------------------------------------------- low-bit linear


@torch.library.custom_op("splitkernels::lowbit_linear", mutates_args=())
def _lowbit_linear(
    x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int, bias: Optional[Tensor]
) -> Tensor:
    return resolve("lowbit_linear", x.device)(x, qweight, scale, zero, bits, group_size, bias)


@_lowbit_linear.register_fake
def _(x, qweight, scale, zero, bits, group_size, bias):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def lowbit_linear(x: Tensor, qweight: QuantizedWeight, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W^T + bias`` with ``W`` a :class:`splitkernels.quant.QuantizedWeight` (W{2,3,4,8} x A16/A32).

    ``x`` is ``[..., K]`` in fp32, fp16 or bf16; the result has x's dtype and shape ``[..., N]``.
    Backends accumulate in fp32; they agree with the reference within a relative Frobenius
    error of 1e-3 (fp16/bf16 activations) or 1e-5 (fp32); 4e-3 where a backend multiplies the
    weight rounded to bf16, as a dense bf16 ``F.linear`` does (the CPU's bf16 activations from
    256 rows, on AMX tiles from 8 to 256 rows by group size: :mod:`splitkernels._backends.cpp`).
    Known exceptions, rows far from zero (3 + randn) against groups of 1024 codes or more (per
    channel): fp32 rows on the CPU 2-5e-5 from float64 (a group's scaled code sum and its zero
    term cancel; up to 1.3e-5 on the AVX-512 VNNI path, which takes such groups as parts), and the
    bf16 weight of a dense bf16 ``F.linear`` 2e-2, as torch's own. A norm over few outputs whose
    terms cancel (N = 1) has no relative bound for any fp32 kernel; the CPU's fp32 rows keep each
    output within 2^-19 of ``sum_k |x_k W_nk|`` (at most 2^-20.5 seen on every instruction set).

    What depends on the weight alone (its layout check, device, the kernel picked and what
    the kernel prepares) is kept per weight and reused while the weight is unchanged
    (:mod:`splitkernels.ops.weight_plan`); ``x`` and ``bias`` are checked on every call.
    """
    if type(x) is not Tensor or x.dtype not in DTYPE_CODE or not x.ndim:
        check_tensor("x", x, FLOAT_DTYPES, min_ndim=1)  # raises, except for a valid tensor subclass
    if torch.compiler.is_compiling():  # traced: check the layout each time, call the op
        if not isinstance(qweight, QuantizedWeight):
            raise TypeError(f"qweight must be a QuantizedWeight, got {type(qweight).__name__}")
        qweight.check()
        plan = None
        q, scale, zero, k = qweight.qweight, qweight.scale, qweight.zero, qweight.in_features
        device = q.device
    else:
        plan = linear_plan(qweight)
        q, scale, zero, k, device = plan.qweight, plan.scale, plan.zero, plan.in_features, plan.device
    dtype = x.dtype
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, qweight expects in_features = {k}")
    if bias is not None:
        check_tensor("bias", bias, FLOAT_DTYPES, ndim=1)
        if bias.shape[0] != q.shape[0]:
            raise ValueError(f"bias must have {q.shape[0]} entries, got {bias.shape[0]}")
        if bias.dtype != dtype:
            bias = bias.to(dtype)
    mixed = plan.mixed_devices if plan is not None else scale.device != device or zero.device != device
    if mixed or x.device != device or (bias is not None and bias.device != device):  # the listing only when needed
        check_same_device(x=x, qweight=q, scale=scale, zero=zero, bias=bias)
    if (plan is not None and plan.eager and type(x) is Tensor
            and (bias is None or type(bias) is Tensor)
            and not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or zero.requires_grad
                                                  or (bias is not None and bias.requires_grad)))):
        return plan.prepared()(x.contiguous(), bias)
    # Autograd, fake or meta tensors, tracing. Scales in another dtype than x go to the backend as
    # they are, on either path: the CPU kernels read them so, the GPU kernels convert them. Rounding
    # an fp32 zero point to bf16 here moved a group's every weight alike: 5e-2 from the reference
    # with activations near 3.
    return _run(_lowbit_linear, "lowbit_linear", device, x.contiguous(), q, scale, zero,
                qweight.bits, qweight.group_size, bias)


# ---------------------------------------------------------------- int8 W8A8


@torch.library.custom_op("splitkernels::int8_linear", mutates_args=())
def _int8_linear(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    return resolve("int8_linear", x.device)(x, w_int8, w_scale, bias)


@_int8_linear.register_fake
def _(x, w_int8, w_scale, bias):
    return x.new_empty(*x.shape[:-1], w_int8.shape[0])


def int8_linear(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """W8A8 linear: x is quantised per token to symmetric int8 (absmax / 127, round half to even),
    multiplied with per-output-channel int8 weights ``w_int8 [N, K]`` (scales ``w_scale [N]``, fp32)
    with exact int32 accumulation, then rescaled: ``y = acc * s_x * s_w + bias`` in x's dtype.
    Use :func:`splitkernels.quant.quantize_weight_int8` to make ``w_int8``/``w_scale``.
    """
    check_tensor("x", x, FLOAT_DTYPES, min_ndim=1)
    check_tensor("w_int8", w_int8, (torch.int8,), ndim=2)
    check_tensor("w_scale", w_scale, (torch.float32,), ndim=1)
    if x.shape[-1] != w_int8.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, w_int8 has K = {w_int8.shape[1]}")
    if w_scale.shape[0] != w_int8.shape[0]:
        raise ValueError(f"w_scale must have {w_int8.shape[0]} entries, got {w_scale.shape[0]}")
    if bias is not None:
        check_tensor("bias", bias, FLOAT_DTYPES, ndim=1)
        if bias.shape[0] != w_int8.shape[0]:
            raise ValueError(f"bias must have {w_int8.shape[0]} entries, got {bias.shape[0]}")
    check_same_device(x=x, w_int8=w_int8, w_scale=w_scale, bias=bias)
    return _run(_int8_linear, "int8_linear", x.device, x.contiguous(), w_int8.contiguous(), w_scale.contiguous(), bias)


# ---------------------------------------------------------------- fused TS + TAB-Q codec


@torch.library.custom_op("splitkernels::ts_tabq_encode", mutates_args=())
def _ts_tabq_encode(
    x: Tensor,
    abs_threshold: bool,
    threshold: float,
    capacity: int,
    bit_choices: list[int],
    eps: float,
    forced_bits: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    kernel = resolve("ts_tabq_encode", x.device)
    return tuple(kernel(x, abs_threshold, threshold, capacity, bit_choices, eps, forced_bits))


@_ts_tabq_encode.register_fake
def _(x, abs_threshold, threshold, capacity, bit_choices, eps, forced_bits):
    return tuple(empty_encode_buffers(x, capacity))


@torch.library.custom_op("splitkernels::ts_tabq_decode", mutates_args=())
def _ts_tabq_decode(
    bits: Tensor, lo: Tensor, step: Tensor, cnt: Tensor, idx: Tensor, val: Tensor, codes: Tensor, d: int
) -> Tensor:
    return resolve("ts_tabq_decode", codes.device)(bits, lo, step, cnt, idx, val, codes, d)


@_ts_tabq_decode.register_fake
def _(bits, lo, step, cnt, idx, val, codes, d):
    return val.new_empty(bits.shape[0], d)


def ts_tabq_encode(
    x: Tensor,
    abs_threshold: bool,
    threshold: float,
    capacity: int,
    bit_choices: list[int],
    eps: float,
    forced_bits: Optional[Tensor] = None,
) -> EncodedBuffers:
    """Fused TS + TAB-Q encode of finite ``x [T, d]`` into fixed-capacity buffers, no host sync.

    Returns :class:`splitkernels.formats.EncodedBuffers`; docs/FORMATS.md has the rules. Most
    users want :func:`splitkernels.codec.encode`, which validates values too.
    """
    check_tensor("x", x, FLOAT_DTYPES, ndim=2)
    if not 0 <= capacity <= x.shape[1]:
        raise ValueError(f"capacity must be in [0, d={x.shape[1]}], got {capacity}")
    for b in bit_choices:
        check_choice("bit_choices entry", b, CODEC_BITS)
    if forced_bits is not None:
        check_tensor("forced_bits", forced_bits, (torch.uint8,), ndim=1)
        if forced_bits.shape[0] != x.shape[0]:
            raise ValueError(f"forced_bits must have T = {x.shape[0]} entries, got {forced_bits.shape[0]}")
        allowed = set(CODEC_BITS) | {raw_width(x.dtype)}
        bad = set(forced_bits.unique().tolist()) - allowed
        if bad:
            raise ValueError(f"forced_bits entries must be in {sorted(allowed)}, got {sorted(bad)}")
    check_same_device(x=x, forced_bits=forced_bits)
    return EncodedBuffers(*_run(
        _ts_tabq_encode, "ts_tabq_encode", x.device, x.contiguous(), bool(abs_threshold), float(threshold),
        int(capacity), [int(b) for b in bit_choices], float(eps), forced_bits,
    ))


def ts_tabq_decode(
    bits: Tensor, lo: Tensor, step: Tensor, cnt: Tensor, idx: Tensor, val: Tensor, codes: Tensor, d: int
) -> Tensor:
    """Decode fixed-capacity codec buffers (as produced by :func:`ts_tabq_encode`) into ``[T, d]``.

    Shapes and dtypes are checked here; the values (widths, counts, indices) are trusted, as they
    come from the encoder or from :func:`splitkernels.codec.from_bytes`, which validates frames.
    """
    check_tensor("bits", bits, (torch.uint8,), ndim=1)
    t = bits.shape[0]
    check_tensor("val", val, FLOAT_DTYPES, ndim=2)
    check_tensor("idx", idx, (torch.int32,), ndim=2)
    check_tensor("codes", codes, (torch.uint8,), ndim=2)
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be a positive int, got {d!r}")
    for name, tensor, dtype in (("lo", lo, torch.float16), ("step", step, torch.float16), ("cnt", cnt, torch.int32)):
        check_tensor(name, tensor, (dtype,), ndim=1)
        if tensor.shape[0] != t:
            raise ValueError(f"{name} must have T = {t} entries, got {tensor.shape[0]}")
    if idx.shape != val.shape or idx.shape[0] != t:
        raise ValueError(f"idx and val must both be [T={t}, C], got {tuple(idx.shape)} and {tuple(val.shape)}")
    if tuple(codes.shape) != (t, d * val.element_size()):
        raise ValueError(f"codes must be [T={t}, d*itemsize={d * val.element_size()}], got {tuple(codes.shape)}")
    check_same_device(bits=bits, lo=lo, step=step, cnt=cnt, idx=idx, val=val, codes=codes)
    return _run(_ts_tabq_decode, "ts_tabq_decode", codes.device, bits, lo, step, cnt, idx, val, codes, d)


__all__ = [
    "pack_bits", "unpack_bits", "lowbit_linear", "int8_linear", "ts_tabq_encode", "ts_tabq_decode",
    "reference", "WEIGHT_BITS", "CODEC_BITS", "BIT_STREAM_WIDTHS", "EncodedBuffers", "QuantizedWeight",
]
