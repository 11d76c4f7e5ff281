"""Codec v2 straight from a tensor to frame bytes and back (docs/FORMATS.md §5.4-§5.6).

``encode_frame_v2(x, config, coder)`` gives the bytes of ``encode_v2(x, config).to_bytes(coder)`` and
``decode_frame_v2(data, config, limits)`` the tensor of ``decode_v2(read_frame_v2(data, config,
limits))``, exactly (and raises FrameError on the same frames). For bit-plane, slot and nibble frames with
the C++ extension built, quantisation and coding run as one pass each way, every row coded or
decoded while it is still in L1, and no ``[T, d]`` symbol matrix is built: this is the fast path of
long prefill frames. A one-token rANS frame (a decode
step) is quantised, coded and framed by one C++ call (:func:`~splitkernels.codec.token_frame.encode_token_frame`).
Everything else takes the general path above.
"""
from __future__ import annotations

import numpy as np
import torch

from .._native import load
from ..ops.checks import FLOAT_DTYPES, check_tensor
from . import frame_center, nibble
from .config_v2 import CodecConfigV2
from .frame import CODE_DTYPES, DTYPE_CODES, MAGIC, MAX_T, FrameError, FrameLimits
from .frame_v2 import (CODER_NAMES, CODER_NIBBLE, CODER_PLANES, CODER_RANS, CODER_RANS_FOUR, CODER_SLOTS, DTYPE_MASK,
                       FRAME_VERSION_V2, HEAD, MAX_POSITION, SCALE_FLAG, decode_symbols, escape_limit, flat_frame, parse_frame_v2, read_scale,
                       read_varint, resolve_coder)
from .token_frame import encode_token_frame
from .v2 import decode_v2, encode_v2
from .wire_dtype import to_wire

_C, _ = load("_C")


def has_fused() -> bool:
    """True when the C++ extension provides the fused encode and decode passes (nibble, bit planes, slots)."""
    return _C is not None and hasattr(_C, "v2_encode_long_frame")


FUSED_CODERS = (CODER_NIBBLE, CODER_PLANES, CODER_SLOTS)


def encode_frame_v2(x: torch.Tensor, config: CodecConfigV2, coder: str | None = None, start: int = 0, tokens=None,
                    embedding: torch.Tensor | None = None, wire_dtype: torch.dtype | None = None) -> bytes:
    """The v2 frame of ``x [T, d]`` (fp32/fp16/bf16, finite) rounded to ``wire_dtype`` (None: as it
    comes; :func:`~splitkernels.codec.wire_dtype.to_wire`), whose first token is at sequence
    position ``start``; ``coder`` as :meth:`EncodedV2.to_bytes`; ``tokens`` and ``embedding`` as
    :func:`~splitkernels.codec.v2.encode_v2` (a config with a prediction takes the general path)."""
    if not isinstance(config, CodecConfigV2):
        raise TypeError(f"config must be a CodecConfigV2, got {type(config).__name__}")
    check_tensor("x", x, FLOAT_DTYPES, ndim=2)
    if x.shape[1] != config.d:
        raise ValueError(f"x must have d = {config.d} channels (the config's), got {x.shape[1]}")
    t, d = x.shape
    code = resolve_coder(coder, t, d, config)
    if t == 1 and code in (CODER_RANS, CODER_RANS_FOUR) and isinstance(start, int) and not isinstance(start, bool) and 0 <= start <= MAX_POSITION:
        frame = encode_token_frame(x, config, start, tokens, embedding, wire_dtype)
        if frame is not None:
            return frame
    x = to_wire(x, wire_dtype)
    if config.prediction is not None:
        return encode_v2(x, config, start, tokens, embedding).to_bytes(coder)
    if code not in FUSED_CODERS or not has_fused() or (isinstance(start, int) and config.row_shifts(start, t).any()):
        return encode_v2(x, config, start).to_bytes(coder)  # also validates start
    x = x.detach().cpu().contiguous()
    frame = _C.v2_encode_long_frame(x.data_ptr(), DTYPE_CODES[x.dtype], t, d, code,
                                    *config.fused_frame_args[CODER_NAMES[code]])
    if frame is None:
        raise ValueError("x must be finite: NaN/Inf activations are rejected by the codec")
    return frame


def _decode_fused_frame(data: bytes | bytearray | memoryview, config: CodecConfigV2 | None,
                        limits: FrameLimits | None) -> torch.Tensor | None:
    """``[T, d]`` of a valid long frame of a fused coder (nibble, bit planes, slots) without shifted
    rows or token ids (with center offsets or not), within ``limits``, in one C++ call (``csrc/cpu/long_frame.cpp``): the header
    read here only to size the output, every check made there. None for any other frame, an invalid
    one, or without the C++ extension: the reference path then decodes it or raises its error."""
    if not has_fused() or type(config) is not CodecConfigV2 or config.prediction is not None:
        return None
    data = flat_frame(data)
    if (data is None or len(data) < 12 or data[:4] != MAGIC or data[4] != FRAME_VERSION_V2
            or data[5] >> 4 not in FUSED_CODERS):  # another coder, or the shifted flag: no output allocated for it
        return None
    dtype = CODE_DTYPES.get(data[5] & DTYPE_MASK)  # bit 3: center offsets, decoded there too
    try:
        if data[5] & SCALE_FLAG:  # the view at the frame's step scale (§5.4.3)
            config = read_scale(data[HEAD.size], config)
        t, _ = read_varint(data, HEAD.size + bool(data[5] & SCALE_FLAG), len(data), "T")
    except FrameError:
        return None
    d = config.d
    # Every coded value costs at least a bit and a raw one 16: an output beyond 8 values per frame
    # byte is a forged header, which the reference reports (and nothing that large is allocated).
    if dtype is None or not 1 <= t <= MAX_T or t * d > 8 * len(data):
        return None
    max_escapes = escape_limit(limits, d, dtype, t)
    if max_escapes is None:
        return None
    out = torch.empty(t, d, dtype=dtype)
    if not _C.v2_decode_long_frame(data, *config.fused_decode_args, DTYPE_CODES[dtype], t, max_escapes, out.data_ptr()):
        return None
    return out


def decode_frame_v2(data: bytes | bytearray | memoryview, config: CodecConfigV2 | None,
                    limits: FrameLimits | None = None, embedding: torch.Tensor | None = None) -> torch.Tensor:
    """Validate and decode a v2 frame to ``[T, d]`` on the host; :class:`FrameError` if anything is
    wrong. ``embedding``: the input embedding table, which a config with a prediction needs."""
    out = _decode_fused_frame(data, config, limits)
    if out is not None:
        return out
    p = parse_frame_v2(data, config, limits)
    config = config.scaled(p.scale)  # checked by the parser
    if p.coder not in FUSED_CODERS or not has_fused() or p.residual_section is not None or p.tokens is not None:
        return decode_v2(decode_symbols(p, config), embedding=embedding)
    d = config.d
    out = torch.empty(p.t, d, dtype=p.dtype)
    flags = np.ascontiguousarray(p.raw, dtype=np.uint8)
    stream = np.frombuffer(p.stream, dtype=np.uint8)
    escapes = p.escapes.contiguous()
    head = (stream.ctypes.data, stream.shape[0], p.t, d, flags.ctypes.data)
    center = frame_center.centers(config, p.center_offset)
    dequantiser = (config.step_array().ctypes.data, center.ctypes.data, config.kmax,
                   DTYPE_CODES[p.dtype], out.data_ptr(), escapes.data_ptr(), escapes.numel())
    if p.coder == CODER_NIBBLE:
        err = _C.v2_decode_nibble(*head, nibble.window_start(config.freqs), *dequantiser)
    else:
        first, second = config.fused_params[CODER_NAMES[p.coder]]
        fused = _C.v2_decode_planes if p.coder == CODER_PLANES else _C.v2_decode_slots
        err = fused(*head, first.ctypes.data, second.ctypes.data, *dequantiser)
    if err:
        raise FrameError(f"symbol stream invalid: {err}")
    if p.n_raw:
        out[torch.from_numpy(p.raw)] = p.raw_values(d)
    return out
