"""The cuda backend: hand-written CUDA kernels from ``csrc/cuda`` (module ``splitkernels._C_cuda``).

The compiled module is torch-free; this file is its torch side: argument checks that keep the
kernels in bounds, output allocation on the input's device, and the launch on the current
stream (no host sync). Available when the module imports, torch sees a CUDA device and the
module's own CUDA runtime can use the driver. Never raises at import.

Ops: pack_bits, unpack_bits, ts_tabq_encode, ts_tabq_decode, lowbit_linear (GEMV for
M = 1..8 with group_size % 32 == 0; other shapes dequantise with a CUDA kernel and call
``torch.nn.functional.linear`` in fp32, the reference's arithmetic). ``int8_linear`` is not
implemented here, so the resolver falls back to the next backend for it.
"""
from __future__ import annotations

import math
from types import ModuleType

import torch
import torch.nn.functional as F

from .._backend import Backend, register_backend
from .._native import BUILD_HINT, load
from ..ops import reference

_HINT = f"The cuda backend needs a CUDA GPU and the CUDA extension: {BUILD_HINT}."
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_C: ModuleType | None = None


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and 16-byte aligned (a fresh copy only for offset views)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _require_cuda(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor for the cuda backend, got device {t.device}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-stream packing of uint8 codes ``[..., n]`` (see :func:`splitkernels.ops.pack_bits`)."""
    _require_cuda("codes", codes)
    codes = codes.contiguous()
    n = codes.shape[-1]
    out = torch.empty(*codes.shape[:-1], reference.packed_nbytes(n, bits), dtype=torch.uint8, device=codes.device)
    rows = math.prod(codes.shape[:-1])
    with torch.cuda.device(codes.device):
        _C.pack_bits(codes.data_ptr(), out.data_ptr(), rows, n, bits, _stream(codes.device))
    return out


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits` for ``n`` codes per row (see :func:`splitkernels.ops.unpack_bits`)."""
    _require_cuda("packed", packed)
    packed = packed.contiguous()
    stride = packed.shape[-1]
    if stride < reference.packed_nbytes(n, bits):
        raise ValueError(f"packed has {stride} bytes per row, {n} codes of {bits} bits need more")
    out = torch.empty(*packed.shape[:-1], n, dtype=torch.uint8, device=packed.device)
    rows = math.prod(packed.shape[:-1])
    with torch.cuda.device(packed.device):
        _C.unpack_bits(packed.data_ptr(), out.data_ptr(), rows, n, stride, bits, _stream(packed.device))
    return out


def _gemv_shape_ok(m: int, k: int, bits: int, group_size: int) -> bool:
    return (
        1 <= m <= _C.GEMV_MAX_M and bits in (2, 3, 4, 8) and group_size % 32 == 0 and k > 0
        and k % group_size == 0 and k < 2**31
    )


def dequantize_weight(
    qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int, k: int
) -> torch.Tensor:
    """``w^ = q * scale + zero`` as fp32 ``[N, K]`` (the reference's two roundings) on the GPU."""
    _require_cuda("qweight", qweight)
    n = qweight.shape[0]
    _check_weight(qweight, scale, zero, n, k, bits, group_size)
    w = torch.empty(n, k, dtype=torch.float32, device=qweight.device)
    with torch.cuda.device(qweight.device):
        _C.dequantize_weight(
            qweight.contiguous().data_ptr(), scale.contiguous().data_ptr(), zero.contiguous().data_ptr(),
            w.data_ptr(), _DTYPE_CODE[scale.dtype], n, k, bits, group_size, _stream(qweight.device),
        )
    return w


def _check_weight(
    qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, n: int, k: int, bits: int, group_size: int
) -> None:
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise TypeError(f"qweight must be a 2-D int32 tensor, got {qweight.dtype} of shape {tuple(qweight.shape)}")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be one of (2, 3, 4, 8), got {bits!r}")
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size must be a positive divisor of K = {k}, got {group_size}")
    if qweight.shape[1] != reference.packed_words(k, bits):
        raise ValueError(f"qweight must have {reference.packed_words(k, bits)} words per row, got {qweight.shape[1]}")
    for name, t in (("scale", scale), ("zero", zero)):
        if t.dtype not in _DTYPE_CODE or tuple(t.shape) != (n, k // group_size):
            raise ValueError(f"{name} must be a float tensor of shape {(n, k // group_size)}, got {t.dtype} "
                             f"{tuple(t.shape)}")


def lowbit_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x @ dequant(W).T + bias`` (see :func:`splitkernels.ops.reference.lowbit_linear`)."""
    _require_cuda("x", x)
    k = x.shape[-1]
    n = qweight.shape[0]
    _check_weight(qweight, scale, zero, n, k, bits, group_size)
    m = x.numel() // k if k else 0
    if not _gemv_shape_ok(m, k, bits, group_size):
        w = dequantize_weight(qweight, scale, zero, bits, group_size, k)
        y = F.linear(x.float(), w, None if bias is None else bias.float())
        return y.to(x.dtype)
    dtype = x.dtype
    x2 = _aligned(x.reshape(m, k))
    scale, zero = _aligned(scale.to(dtype)), _aligned(zero.to(dtype))
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape {(n,)}, got {tuple(bias.shape)}")
        bias = bias.to(dtype).contiguous()
    y = torch.empty(m, n, dtype=dtype, device=x.device)
    with torch.cuda.device(x.device):
        _C.lowbit_gemv(
            x2.data_ptr(), _aligned(qweight).data_ptr(), scale.data_ptr(), zero.data_ptr(),
            0 if bias is None else bias.data_ptr(), y.data_ptr(), _DTYPE_CODE[dtype], m, n, k, bits, group_size,
            _stream(x.device),
        )
    return y.reshape(*x.shape[:-1], n)


def ts_tabq_encode(
    x: torch.Tensor,
    abs_threshold: bool,
    threshold: float,
    capacity: int,
    bit_choices: list[int],
    eps: float,
    forced_bits: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """Fused TS + TAB-Q encode, one block per token (see :func:`splitkernels.ops.reference.ts_tabq_encode`)."""
    _require_cuda("x", x)
    t, d = x.shape
    if t == 0 or d == 0 or d > _C.CODEC_MAX_D:
        # Nothing to launch, or a row wider than the kernel's shared-memory mask: the
        # reference gives the same outputs.
        return reference.ts_tabq_encode(x, abs_threshold, threshold, capacity, bit_choices, eps, forced_bits)
    if not 0 <= capacity <= d:
        raise ValueError(f"capacity must be in [0, d={d}], got {capacity}")
    menu = 0
    for b in bit_choices:
        if not 1 <= b <= 8:
            raise ValueError(f"bit_choices entries must be in 1..8, got {b}")
        menu |= 1 << (b - 1)
    if forced_bits is not None:
        if forced_bits.dtype != torch.uint8 or tuple(forced_bits.shape) != (t,):
            raise ValueError(f"forced_bits must be uint8 of shape {(t,)}, got {forced_bits.dtype} "
                             f"{tuple(forced_bits.shape)}")
        forced_bits = forced_bits.to(x.device).contiguous()
    x = x.contiguous()
    dev = x.device
    bits, lo, step, hi, cnt, idx, val, codes, nbytes = reference.empty_encode_buffers(x, capacity)
    with torch.cuda.device(dev):
        _C.ts_tabq_encode(
            x.data_ptr(), _DTYPE_CODE[x.dtype], t, d, bool(abs_threshold), float(threshold), capacity, menu,
            float(eps), 0 if forced_bits is None else forced_bits.data_ptr(), bits.data_ptr(), lo.data_ptr(),
            step.data_ptr(), hi.data_ptr(), cnt.data_ptr(), idx.data_ptr(), val.data_ptr(), codes.data_ptr(),
            nbytes.data_ptr(), _stream(dev),
        )
    return bits, lo, step, hi, cnt, idx, val, codes, nbytes


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
    """Decode fixed-capacity buffers into ``[T, d]`` (see :func:`splitkernels.ops.reference.ts_tabq_decode`)."""
    _require_cuda("codes", codes)
    if val.dtype not in _DTYPE_CODE:
        raise TypeError(f"val must be float32, float16 or bfloat16, got {val.dtype}")
    t = bits.shape[0]
    dev = codes.device
    if t == 0 or d == 0 or d > _C.CODEC_MAX_D:
        return reference.ts_tabq_decode(bits, lo, step, cnt, idx, val, codes, d)
    capacity = idx.shape[1] if idx.dim() == 2 else -1
    row = d * val.element_size()
    shapes = {"lo": (lo, (t,)), "step": (step, (t,)), "cnt": (cnt, (t,)), "idx": (idx, (t, capacity)),
              "val": (val, (t, capacity))}
    for name, (tensor, shape) in shapes.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} to match bits [T={t}] and idx, got {tuple(tensor.shape)}")
    if codes.dim() != 2 or codes.shape[0] != t or codes.shape[1] < row or codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8 [T={t}, >= {row}], got {codes.dtype} {tuple(codes.shape)}")
    codes = codes.contiguous()
    if codes.shape[1] % val.element_size() or codes.data_ptr() % val.element_size():
        # Raw rows are read as whole elements.
        codes = codes[:, :row].clone()
    args = [
        bits.to(dev, torch.uint8).contiguous(), lo.to(dev, torch.float16).contiguous(),
        step.to(dev, torch.float16).contiguous(), cnt.to(dev, torch.int32).contiguous(),
        idx.to(dev, torch.int32).contiguous(), val.to(dev).contiguous(),
    ]
    out = torch.empty(t, d, dtype=val.dtype, device=dev)
    with torch.cuda.device(dev):
        _C.ts_tabq_decode(
            *(a.data_ptr() for a in args), codes.data_ptr(), _DTYPE_CODE[val.dtype], t, d, capacity, codes.shape[1],
            out.data_ptr(), _stream(dev),
        )
    return out


def _make() -> Backend:
    global _C
    module, reason = load("_C_cuda")
    if module is None:
        return Backend("cuda", devices=(), unavailable_reason=reason, install_hint=_HINT)
    if not torch.cuda.is_available():
        return Backend("cuda", devices=(), unavailable_reason="no CUDA device (torch.cuda.is_available() is False)",
                       install_hint=_HINT)
    try:
        if module.device_count() < 1:
            raise RuntimeError("no device visible")
    except RuntimeError as exc:
        # Typically a driver older than the toolkit this module was built with.
        return Backend("cuda", devices=(), unavailable_reason=f"splitkernels._C_cuda cannot use the GPU ({exc})",
                       install_hint=_HINT)
    _C = module
    return Backend(
        "cuda",
        devices=("cuda",),
        kernels={
            "pack_bits": pack_bits,
            "unpack_bits": unpack_bits,
            "lowbit_linear": lowbit_linear,
            "ts_tabq_encode": ts_tabq_encode,
            "ts_tabq_decode": ts_tabq_decode,
        },
        install_hint=_HINT,
    )


register_backend(_make())
