"""Codec v2 on a GPU (docs/FORMATS.md §5.5): the fused device pass, then one compact copy for the host rANS.

The backends' kernels (registered as ``codec_v2_encode`` / ``codec_v2_decode``: CUDA in
``csrc/cuda/codec_v2.cu``, Triton in ``splitkernels/triton/codec_v2_*.py``) read and write one
packed byte buffer laid out by :func:`layout`:

    [0, 32)            int64 header: escaped values, raw tokens, non-finite inputs
    [32, 32 + T)       raw flags u8 [T]
    [sym_off, +T*d)    symbols u8 [T, d] (raw tokens' rows 0)
    [val_off, ...)     values in the input dtype: the escapes of the coded tokens (token-major,
                       channel ascending), then the raw tokens' rows in token order

so what the frame writer needs is the buffer's prefix of ``val_off + (escapes + n_raw * d) *
itemsize`` bytes. Encode copies ``val_off`` plus a spill allowance (:func:`spill_bytes`) in one
device-to-host copy into pinned memory; only a frame whose escapes and raw tokens exceed that
allowance needs a second copy of the rest. Decode assembles the same layout on the host and
copies it to the device once.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

from ..registry import resolve
from .config_v2 import CodecConfigV2
from .frame import byte_view

HEADER_BYTES = 32
ENCODE_OP = "codec_v2_encode"
DECODE_OP = "codec_v2_decode"
# Values the one-copy encode brings back besides the symbols: 1/8 of the frame's values, at
# least 64 KiB (all of a decode frame's), never more than the frame holds.
SPILL_FRACTION = 8
SPILL_MIN_BYTES = 64 << 10


class Layout(NamedTuple):
    """Byte offsets of the packed buffer for ``t`` tokens of ``d`` channels of ``item`` bytes."""

    t: int
    d: int
    item: int
    sym_off: int
    val_off: int
    capacity: int  # the worst case: every value escaped or raw

    def used_bytes(self, n_escapes: int, n_raw: int) -> int:
        return self.val_off + (n_escapes + n_raw * self.d) * self.item


def _align16(n: int) -> int:
    return (n + 15) // 16 * 16


def layout(t: int, d: int, item: int) -> Layout:
    """The packed layout (module docstring); offsets are multiples of 16."""
    sym_off = _align16(HEADER_BYTES + t)
    val_off = _align16(sym_off + t * d)
    return Layout(t, d, item, sym_off, val_off, val_off + t * d * item)


def spill_bytes(lay: Layout) -> int:
    """Value bytes the first (usually only) device-to-host copy of an encode brings back."""
    full = lay.t * lay.d * lay.item
    return min(full, max(full // SPILL_FRACTION, SPILL_MIN_BYTES))


def kernel(op: str, device: torch.device) -> Callable | None:
    """The registered device kernel for ``op`` on ``device``, or None: the host path runs.

    CPU tensors get a kernel only inside ``use_backend("triton")`` with the Triton interpreter (tests).
    """
    try:
        return resolve(op, device)
    except RuntimeError:  # no backend has a kernel for this device, or the forced one has none
        return None


_arrays: dict[tuple[int, torch.device], tuple[CodecConfigV2, dict[str, torch.Tensor]]] = {}
_ARRAYS_KEPT = 8


def config_arrays(config: CodecConfigV2, device: torch.device) -> dict[str, torch.Tensor]:
    """``center``, ``inv_step`` and ``step`` as fp32 ``[d]`` on ``device``, uploaded once per config."""
    key = (id(config), device)
    hit = _arrays.get(key)
    if hit is not None and hit[0] is config:
        return hit[1]
    arrays = {name: torch.tensor(getattr(config, f"{name}_array")(), device=device)
              for name in ("center", "inv_step", "step")}
    if len(_arrays) >= _ARRAYS_KEPT:
        _arrays.pop(next(iter(_arrays)))
    _arrays[key] = (config, arrays)
    return arrays


def _host_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")


def _to_host(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy device bytes into (pinned) host bytes and wait for them."""
    if src.device.type == "cuda":
        dst.copy_(src, non_blocking=True)
        torch.cuda.current_stream(src.device).synchronize()
    else:
        dst.copy_(src)


def encode(x: torch.Tensor, config: CodecConfigV2, run: Callable, center: np.ndarray | None = None) -> tuple[torch.Tensor, ...]:
    """Quantise ``x [T, d]`` on its device with the kernel ``run``; host ``(symbols, raw, escapes,
    raw_values, nonfinite)`` as the frame writer needs them (views of one pinned buffer).
    ``center``: a frame's centers (fp32 ``[d]``) instead of the config's."""
    t, d = x.shape
    lay = layout(t, d, x.element_size())
    if t == 0:
        empty = x.new_empty((0,), device="cpu")
        return torch.empty(0, d, dtype=torch.uint8), torch.zeros(0, dtype=torch.bool), empty, empty.reshape(0, d), 0
    arrays = config_arrays(config, x.device)
    centers = arrays["center"] if center is None else torch.from_numpy(center).to(x.device)
    packed = torch.empty(lay.capacity, dtype=torch.uint8, device=x.device)
    run(x.contiguous(), centers, arrays["inv_step"], config.kmax, config.raw_limit, packed, lay.sym_off,
        lay.val_off)
    first = lay.val_off + spill_bytes(lay)
    host = _host_buffer(lay.capacity if first == lay.capacity else first, x.device)
    _to_host(packed[:first], host[:first])
    n_esc, n_raw, nonfinite = host.numpy()[:24].view(np.int64).tolist()  # (numpy: a third of torch's cost)
    used = lay.used_bytes(n_esc, n_raw)
    if used > first:  # more escapes or raw tokens than the allowance: the rest in a second copy
        bigger = _host_buffer(used, x.device)
        bigger[:first].copy_(host[:first])
        _to_host(packed[first:used], bigger[first:used])
        host = bigger
    sym = host[lay.sym_off:lay.sym_off + t * d].view(t, d)
    raw = host[HEADER_BYTES:HEADER_BYTES + t].view(torch.bool)
    values = host[lay.val_off:used].view(x.dtype)
    return sym, raw, values[:n_esc], values[n_esc:].view(n_raw, d), nonfinite


def decode(symbols: torch.Tensor, raw: torch.Tensor, escapes: torch.Tensor, raw_values: torch.Tensor,
           config: CodecConfigV2, device: torch.device, run: Callable, center: np.ndarray | None = None) -> torch.Tensor:
    """Dequantise host ``symbols``/``raw``/``escapes``/``raw_values`` on ``device`` with the kernel
    ``run`` after one host-to-device copy. The counts are checked on the host first. ``center``:
    a frame's centers instead of the config's."""
    t, d = symbols.shape
    dtype = escapes.dtype
    n_esc, n_raw = escapes.numel(), raw_values.shape[0]
    # The host side in numpy: a frame of one token is a few microseconds of slicing, which torch's
    # per-op cost made most of the step (30 -> 14 us on a CPU, the kernel stubbed).
    sym = symbols.cpu().contiguous().numpy()
    flags = raw.cpu().contiguous().numpy()
    n_sym = int(np.count_nonzero(sym == config.escape_symbol))
    if n_sym != n_esc:
        raise ValueError(f"encoded holds {n_sym} escape symbols but {n_esc} escaped values")
    if int(np.count_nonzero(flags)) != n_raw:
        raise ValueError(f"encoded marks {int(np.count_nonzero(flags))} raw tokens but holds {n_raw} raw rows")
    out = torch.empty(t, d, dtype=dtype, device=device)
    if t == 0:
        return out
    lay = layout(t, d, escapes.element_size())
    used = lay.used_bytes(n_esc, n_raw)
    host = _host_buffer(used, device)
    packed_np = host.numpy()
    packed_np[:HEADER_BYTES] = 0
    packed_np[HEADER_BYTES:HEADER_BYTES + t] = flags
    packed_np[lay.sym_off:lay.sym_off + t * d] = sym.reshape(-1)
    values_end = lay.val_off + n_esc * lay.item
    if n_esc:
        packed_np[lay.val_off:values_end] = byte_view(escapes.cpu())
    if n_raw:
        packed_np[values_end:used] = byte_view(raw_values.cpu())
    packed = host.to(device, non_blocking=True) if device.type == "cuda" else host
    arrays = config_arrays(config, device)
    centers = arrays["center"] if center is None else torch.from_numpy(center).to(device)
    run(packed, lay.sym_off, lay.val_off, n_esc, arrays["step"], centers, config.kmax, out)
    return out
