"""The cuda backend: hand-written CUDA kernels from ``csrc/cuda`` (module ``splitkernels._C_cuda``).

The compiled module is torch-free; this file is its torch side: arguments arrive checked by the
op layer (:mod:`splitkernels.ops`), this file allocates outputs on the input's device and
launches on the current stream (no host sync). Available when the module imports, torch sees a
CUDA device and the module's own CUDA runtime can use the driver. Never raises at import.

Ops: pack_bits, unpack_bits, ts_tabq_encode, ts_tabq_decode, lowbit_linear (fused GEMV for
M = 1..16 with group_size % 32 == 0, on tensor cores for W4 with fp16/bf16 activations, M = 2..32
and group_size % 128 == 0, splitting K over several blocks when N alone gives too few warps;
other shapes go to Triton's lowbit_linear when Triton is available and no backend is forced,
else dequantise with a CUDA kernel and call ``torch.nn.functional.linear`` in fp32, the
reference's arithmetic). ``int8_linear`` is not
implemented here, so the resolver falls back to the next backend for it. Priority on CUDA
tensors: below ``triton``, above ``reference``; except lowbit_linear and the codec v2 device
pass (codec_v2_encode, codec_v2_decode: :mod:`splitkernels.codec.v2_device`), where this
backend comes first (measured on an H200, bench/results/gpu-20261130).
"""
from __future__ import annotations

import math
from types import ModuleType

import torch
import torch.nn.functional as F

from .._native import BUILD_HINT, load
from ..formats import DTYPE_CODE, empty_encode_buffers, packed_nbytes
from ..ops import reference
from ..registry import current_backend, declare_backend, get_backend

_HINT = f"The cuda backend needs a CUDA GPU and the CUDA extension: {BUILD_HINT}."
_CUDA = {"cuda": 20}
# lowbit_linear prefers this backend on CUDA tensors: its fused GEMV beat Triton's at every M it
# takes on an H200 (bench/results/gpu-20261130/run3: 12.6 vs 18.0 us at M = 1, 4096^2, W4).
_CUDA_GEMV = {"cuda": 40}

_C: ModuleType | None = None
# GEMV split-K: the split count per (device, M, N, K, bits, group_size, dtype), and per (device,
# stream) the kernel's finished-split counters, which it leaves zero after every launch.
_GEMV_SPLITS: dict[tuple, int] = {}
_GEMV_FUSED: dict[tuple, bool] = {}
_GEMV_TILE_DONE: dict[tuple[int | None, int], torch.Tensor] = {}


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and 16-byte aligned (a fresh copy only for offset views)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


def _require_cuda(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor for the cuda backend, got device {t.device}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-stream packing of uint8 codes ``[..., n]`` (see :func:`splitkernels.ops.pack_bits`)."""
    _require_cuda("codes", codes)
    codes = codes.contiguous()
    n = codes.shape[-1]
    out = torch.empty(*codes.shape[:-1], packed_nbytes(n, bits), dtype=torch.uint8, device=codes.device)
    rows = math.prod(codes.shape[:-1])
    with torch.cuda.device(codes.device):
        _C.pack_bits(codes.data_ptr(), out.data_ptr(), rows, n, bits, _stream(codes.device))
    return out


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits` for ``n`` codes per row (see :func:`splitkernels.ops.unpack_bits`)."""
    _require_cuda("packed", packed)
    packed = packed.contiguous()
    stride = packed.shape[-1]
    out = torch.empty(*packed.shape[:-1], n, dtype=torch.uint8, device=packed.device)
    rows = math.prod(packed.shape[:-1])
    with torch.cuda.device(packed.device):
        _C.unpack_bits(packed.data_ptr(), out.data_ptr(), rows, n, stride, bits, _stream(packed.device))
    return out


def _gemv_shape_ok(m: int, k: int, bits: int, group_size: int, dtype: torch.dtype) -> bool:
    """Whether the fused GEMV takes this product (the launcher's own rule, cached)."""
    if m < 1 or dtype not in DTYPE_CODE:
        return False
    key = (m, k, bits, group_size, dtype)
    ok = _GEMV_FUSED.get(key)
    if ok is None:
        ok = _GEMV_FUSED[key] = bool(_C.gemv_fused(m, k, bits, group_size, DTYPE_CODE[dtype]))
    return ok


def _gemv_workspace(
    device: torch.device, m: int, n: int, k: int, bits: int, group_size: int, dtype: int
) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """Split count of an M x N x K GEMV and its workspaces (fp32 partials, tile counters)."""
    key = (device.index, m, n, k, bits, group_size, dtype)
    splits = _GEMV_SPLITS.get(key)
    if splits is None:
        splits = _GEMV_SPLITS[key] = _C.gemv_splits(m, n, k, bits, group_size, dtype)
    if splits == 1:
        return 1, None, None
    tiles = -(-n // _C.GEMV_TILE_ROWS)
    partial = torch.empty(splits, m, n, dtype=torch.float32, device=device)
    if _capturing():
        # A captured graph may be replayed on any stream, beside launches that use that stream's
        # counters: each captured launch gets counters of its own from the graph's memory pool,
        # zeroed by a captured fill (the kernel leaves them zero, the fill makes that hold at the
        # first replay). Unsplit in graphs, 4-16 token products ran at 0.37-0.41x of cuBLAS on an
        # H200 (bench/gpu_decode_chain.py, 2026-12-04): a 4096-row layer was 64 blocks.
        return splits, partial, torch.zeros(tiles, dtype=torch.int32, device=device)
    stream_key = (device.index, _stream(device))
    done = _GEMV_TILE_DONE.get(stream_key)
    if done is None or done.numel() < tiles:
        done = torch.zeros(max(tiles, 256), dtype=torch.int32, device=device)
        _GEMV_TILE_DONE[stream_key] = done
    return splits, partial, done


def dequantize_weight(
    qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int, k: int
) -> torch.Tensor:
    """``w^ = q * scale + zero`` as fp32 ``[N, K]`` (the reference's two roundings) on the GPU."""
    _require_cuda("qweight", qweight)
    n = qweight.shape[0]
    w = torch.empty(n, k, dtype=torch.float32, device=qweight.device)
    with torch.cuda.device(qweight.device):
        _C.dequantize_weight(
            qweight.contiguous().data_ptr(), scale.contiguous().data_ptr(), zero.contiguous().data_ptr(),
            w.data_ptr(), DTYPE_CODE[scale.dtype], n, k, bits, group_size, _stream(qweight.device),
        )
    return w


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
    m = x.numel() // k if k else 0
    if not _gemv_shape_ok(m, k, bits, group_size, x.dtype):
        larger = _larger_m_kernel()
        if larger is not None:
            return larger(x, qweight, scale, zero, bits, group_size, bias)
        w = dequantize_weight(qweight, scale, zero, bits, group_size, k)
        y = F.linear(x.float(), w, None if bias is None else bias.float())
        return y.to(x.dtype)
    dtype = x.dtype
    x2 = _aligned(x.reshape(m, k))
    scale, zero = _aligned(scale.to(dtype)), _aligned(zero.to(dtype))
    if bias is not None:
        bias = bias.to(dtype).contiguous()
    y = torch.empty(m, n, dtype=dtype, device=x.device)
    with torch.cuda.device(x.device):
        splits, partial, done = _gemv_workspace(x.device, m, n, k, bits, group_size, DTYPE_CODE[dtype])
        _C.lowbit_gemv(
            x2.data_ptr(), _aligned(qweight).data_ptr(), scale.data_ptr(), zero.data_ptr(),
            0 if bias is None else bias.data_ptr(), y.data_ptr(), DTYPE_CODE[dtype], m, n, k, bits, group_size,
            splits, 0 if partial is None else partial.data_ptr(), 0 if done is None else done.data_ptr(),
            _stream(x.device),
        )
    return y.reshape(*x.shape[:-1], n)


def _larger_m_kernel():
    """Triton's lowbit_linear for the products the fused GEMV does not take (prefill-sized M),
    unless this backend is forced or Triton is unavailable: its tiled and cached-dequantise paths
    beat this module's dequantise + fp32 matmul (H200: 42 vs 181 us at M = 64, 4096^2, W4)."""
    if current_backend() is not None:
        return None
    triton = get_backend("triton")
    return triton.kernels.get("lowbit_linear")


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
    menu = 0
    for b in bit_choices:
        menu |= 1 << (b - 1)
    if forced_bits is not None:
        forced_bits = forced_bits.to(x.device).contiguous()
    x = x.contiguous()
    dev = x.device
    out = empty_encode_buffers(x, capacity)
    with torch.cuda.device(dev):
        _C.ts_tabq_encode(
            x.data_ptr(), DTYPE_CODE[x.dtype], t, d, bool(abs_threshold), float(threshold), capacity, menu,
            float(eps), 0 if forced_bits is None else forced_bits.data_ptr(), *(b.data_ptr() for b in out),
            _stream(dev),
        )
    return out


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
    t = bits.shape[0]
    dev = codes.device
    if t == 0 or d == 0 or d > _C.CODEC_MAX_D:
        return reference.ts_tabq_decode(bits, lo, step, cnt, idx, val, codes, d)
    capacity = idx.shape[1]
    row = d * val.element_size()
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
            *(a.data_ptr() for a in args), codes.data_ptr(), DTYPE_CODE[val.dtype], t, d, capacity, codes.shape[1],
            out.data_ptr(), _stream(dev),
        )
    return out


def _v2_scratch(t: int, device: torch.device) -> torch.Tensor | None:
    """The per-token scratch (int64 [4, T]) of the codec v2 launches; None for a frame of one token,
    whose single launch needs none."""
    return torch.empty(4 * t, dtype=torch.int64, device=device) if t > 1 else None


def codec_v2_encode(x: torch.Tensor, center: torch.Tensor, inv_step: torch.Tensor, kmax: int, raw_limit: int,
                    packed: torch.Tensor, sym_off: int, val_off: int) -> None:
    """Codec v2 quantise of ``x [T >= 1, d]`` into ``packed`` (layout: :mod:`splitkernels.codec.v2_device`)."""
    _require_cuda("x", x)
    t, d = x.shape
    scratch = _v2_scratch(t, x.device)
    with torch.cuda.device(x.device):
        _C.v2_encode(x.data_ptr(), DTYPE_CODE[x.dtype], t, d, center.data_ptr(), inv_step.data_ptr(), kmax, raw_limit,
                     packed.data_ptr(), sym_off, val_off, 0 if scratch is None else scratch.data_ptr(),
                     _stream(x.device))


def codec_v2_decode(packed: torch.Tensor, sym_off: int, val_off: int, n_escapes: int, step: torch.Tensor,
                    center: torch.Tensor, kmax: int, out: torch.Tensor) -> None:
    """Codec v2 dequantise of ``packed`` (:mod:`splitkernels.codec.v2_device`) into ``out [T >= 1, d]``."""
    _require_cuda("out", out)
    t, d = out.shape
    scratch = _v2_scratch(t, out.device)
    with torch.cuda.device(out.device):
        _C.v2_decode(packed.data_ptr(), sym_off, val_off, n_escapes, t, d, step.data_ptr(), center.data_ptr(), kmax,
                     DTYPE_CODE[out.dtype], out.data_ptr(), 0 if scratch is None else scratch.data_ptr(),
                     _stream(out.device))


def _load() -> str | None:
    """Load the extension into ``_C``; the reason the backend cannot run here, or None."""
    global _C
    module, reason = load("_C_cuda")
    if module is None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    try:
        if module.device_count() < 1:
            raise RuntimeError("no device visible")
    except RuntimeError as exc:
        # Typically a driver older than the toolkit this module was built with.
        return f"splitkernels._C_cuda cannot use the GPU ({exc})"
    _C = module
    return None


declare_backend("cuda", unavailable_reason=_load(), install_hint=_HINT).add_kernels(
    {
        "pack_bits": pack_bits,
        "unpack_bits": unpack_bits,
        "ts_tabq_encode": ts_tabq_encode,
        "ts_tabq_decode": ts_tabq_decode,
    },
    priority=_CUDA,
).add_kernels(
    {"lowbit_linear": lowbit_linear, "codec_v2_encode": codec_v2_encode, "codec_v2_decode": codec_v2_decode},
    priority=_CUDA_GEMV,
)
