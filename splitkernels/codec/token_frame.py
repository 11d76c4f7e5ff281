"""Fast path of the commonest frame: a codec v2 frame of one token coded with rANS on one or four
lanes (every decode step of a session). The server's :func:`decode_token_frame` parses, checks, entropy decodes and
dequantises it in one C++ call (``csrc/cpu/token_frame.cpp``) instead of the Python parser, the rANS
decoder and the dequantiser one after another (~90 us of Python per frame, paid under the server's
GIL once per session per step). The edge's :func:`encode_token_frame` quantises, codes and frames
it in one call: right after the edge's forward pass the Python path runs with cold caches (one
token took 461 us after a 64 MiB copy against 80 us warm; bench/results/codec_v2/README.md).

A token at an early position or of a sink-prone id (docs/FORMATS.md §5.2, §5.2.2) codes its fine
codes in the same call: the shift comes from the config (here), the residual section is packed and
read in C++. :func:`decode_token_frame` returns None for anything else (more tokens, the nibble
coder, a raw token with the shifted bit, a shifted bit whose token has no shift, no C++ extension)
and for any frame it finds invalid; the caller then
runs the reference path (:func:`splitkernels.codec.frame_v2.parse_frame_v2` and the rest), which
decodes or raises exactly as it always did. The fast path accepts only frames the reference
accepts and gives the same bits (tested frame by frame, corrupted frames included). With a
config's token prediction (docs/FORMATS.md §5.2.1) both sides code the residual in fp32 and the
C++ call writes or skips the id section; the prediction itself is one fp32 multiply here.
"""
from __future__ import annotations

from typing import Callable

import torch

from .._native import load
from .config_v2 import CodecConfigV2
from .frame import CODE_DTYPES, DTYPE_CODES, FrameError, FrameLimits
from .frame_v2 import (TOKEN_DTYPE, TOKEN_MARKERS, TOKEN_RAW, TOKEN_SHIFTED, TOKEN_TAG_MASK, escape_limit, flat_frame,
                       rans_coder, rans_stream_lanes, read_scale, read_varint)
from .wire_dtype import to_wire

_C, _ = load("_C")
_MIN_BYTES = 6  # tag, escape count, CRC
_MAX_CONFIGS = 16
# Per config (by identity, the config kept alive beside its addresses): the C++ call's arguments
# after the frame, read once (numpy's ``.ctypes.data`` costs microseconds per call).
_ARGS: dict[int, tuple[CodecConfigV2, tuple]] = {}
_ENC_ARGS: dict[int, tuple[CodecConfigV2, tuple]] = {}  # the same for the encoder


def has_native() -> bool:
    """True when the C++ extension provides the one-token fast path."""
    return _C is not None and hasattr(_C, "v2_decode_token_frame")


def _cached(cache: dict[int, tuple[CodecConfigV2, tuple]], config: CodecConfigV2,
            build: Callable[[CodecConfigV2], tuple]) -> tuple:
    entry = cache.get(id(config))
    if entry is not None and entry[0] is config:
        return entry[1]
    args = build(config)
    if len(cache) >= _MAX_CONFIGS:  # many configs in turn: start over (no iteration while other threads insert)
        cache.clear()
    cache[id(config)] = (config, args)
    return args


def _decoder_args(config: CodecConfigV2) -> tuple:
    ptrs, classes = config.rans_tables.native, config.rans_tables.native_classes
    return (config.crc_seed, config.d, config.kmax, ptrs.ctypes.data, ptrs.shape[0], classes.ctypes.data,
            classes.shape[0], config.step_array().ctypes.data,
            config.center_array().ctypes.data, config.frame_scale)


def _encoder_args(config: CodecConfigV2) -> tuple:
    ptrs = config.rans_tables.native
    lanes = rans_stream_lanes(rans_coder(1, config.d), config.d)  # the writer's layout, as the general path's
    return (config.crc_seed, config.d, config.kmax, ptrs.ctypes.data, ptrs.shape[0], config.inv_step_array().ctypes.data,
            config.center_array().ctypes.data, config.frame_scale, config.raw_limit, lanes)


def _token_id(data: bytes | bytearray | memoryview, config: CodecConfigV2, pos: int) -> int | None:
    """The id of a one-token frame under the config's prediction (after the escape count's varint
    at ``pos``), or None when the frame is too short or the id invalid."""
    while pos < len(data) and data[pos] & 0x80:
        pos += 1
    n = config.prediction.id_bytes(1)
    if pos + 1 + n > len(data):
        return None
    return config.prediction.id_of_section(data[pos + 1 : pos + 1 + n])


def _token_shift(config: CodecConfigV2, start: int, token: int | None) -> int:
    """The shift of a one-token frame's token at position ``start`` (its id ``token`` under a
    prediction; docs/FORMATS.md §5.2, §5.2.2), 0 past the config's shifted positions."""
    if start >= config.shift_end:
        return 0
    return int(config.row_shifts(start, 1, None if token is None else (token,))[0])


def decode_token_frame(data: bytes | bytearray | memoryview, config: CodecConfigV2 | None,
                       limits: FrameLimits | None = None, embedding: torch.Tensor | None = None) -> torch.Tensor | None:
    """``[1, d]`` (the frame's dtype, on the host) of a valid one-token rANS v2 frame within
    ``limits``; None for any other frame, an invalid one, or without the C++ extension (then
    the reference path decides). A config with a prediction needs ``embedding`` (else None)."""
    if not has_native() or type(config) is not CodecConfigV2:
        return None
    pred = config.prediction
    if pred is not None and not isinstance(embedding, torch.Tensor):
        return None
    data = flat_frame(data)
    if data is None or len(data) < _MIN_BYTES:
        return None
    marker = data[0] & ~(TOKEN_SHIFTED | TOKEN_RAW | TOKEN_DTYPE)  # a token form's marker with the coder bit clear
    if marker & ~TOKEN_TAG_MASK or marker not in TOKEN_MARKERS:
        return None
    count_at = 1  # the escape count's position: after the tag, a scale byte and a start position
    if TOKEN_MARKERS[marker][0]:  # the view at the frame's scale (§5.4.3)
        try:
            config = read_scale(data[1], config)
        except FrameError:
            return None
        count_at = 2
    start = shift = 0
    if data[0] & TOKEN_SHIFTED:  # the token's shift, from its start position (and id, §5.2.2)
        try:
            start, count_at = read_varint(data, count_at, len(data), "start position")
        except FrameError:
            return None
        if start >= config.shift_end:
            return None  # the reference decides what a shifted frame without a shifted token is
        token = None if pred is None else _token_id(data, config, count_at)
        if pred is not None and token is None:
            return None
        shift = _token_shift(config, start, token)
        if shift == 0:
            return None
    code = data[0] & TOKEN_DTYPE
    dtype = CODE_DTYPES.get(code)
    if dtype is None:
        return None
    max_escapes = escape_limit(limits, config.d, dtype, 1)
    if max_escapes is None:
        return None
    out = torch.empty(1, config.d, dtype=dtype)
    crc_seed, d, kmax, tables, period, classes, n_classes, step, center, scale = _cached(_ARGS, config, _decoder_args)
    id_bytes = 0 if pred is None else pred.id_bytes(1)
    # Positional arguments from locals: a star-unpacked tuple cost ~0.4 us more per call.
    if not _C.v2_decode_token_frame(data, crc_seed, d, kmax, tables, period, classes, n_classes, step, center, scale,
                                    code, max_escapes, id_bytes, start, shift, out.data_ptr()):
        return None
    if pred is None:
        return out
    token = _token_id(data, config, count_at)
    if token is None:
        return None
    try:
        pred.check_table(embedding)
    except ValueError:
        return None  # the general path raises it
    return out.float() + pred.values(token, embedding, out.device)


def has_native_encoder() -> bool:
    """True when the C++ extension provides the one-token encoder."""
    return _C is not None and hasattr(_C, "v2_encode_token_frame")


def encode_token_frame(x: torch.Tensor, config: CodecConfigV2, start: int, tokens=None,
                       embedding: torch.Tensor | None = None, wire_dtype: torch.dtype | None = None) -> bytes | None:
    """The rANS v2 frame of one token ``x [1, d]`` (a checked tensor of the config's ``d``) at
    position ``start`` in ``wire_dtype`` (None: x's), byte for byte as :func:`splitkernels.codec.v2.encode_v2`
    and ``to_bytes()`` write it for ``to_wire(x, wire_dtype)``: the C++ call rounds x itself (right
    after the edge's forward pass, the torch ops of a separate cast took 122-208 us with cold caches
    against 13 us warm; bench/results/codec_v2/README.md). None when the general path must write it:
    no C++ encoder, a token with more than ``raw_limit`` escapes (sent raw), a non-finite value or
    one the wire dtype cannot hold (which the general path rejects). A token at a shifted position
    (or of a shifted id) codes its fine codes and residual section in the same call. A token on a
    GPU is copied to the host first (its d values): at T = 1 the device pass costs more in launches
    and copies than the host path (H200: 112 us against 51 us, bench/results/gpu-20261130), and
    the codes are bit-exact across backends.
    With a prediction, ``tokens`` and ``embedding`` as :func:`~splitkernels.codec.v2.encode_v2`
    (ValueError when they are missing or wrong)."""
    if not has_native_encoder() or type(config) is not CodecConfigV2:
        return None
    pred = config.prediction
    token = None if pred is None else pred.token_id(tokens)
    shift = _token_shift(config, start, token)
    ids = b""
    if pred is not None:
        pred.check_table(embedding)
        x = to_wire(x.detach(), wire_dtype).float() - pred.values(token, embedding, x.device)
        ids = pred.id_section(token)
        wire_dtype = None  # the residual travels in fp32
    if not (x.is_cpu and x.is_contiguous()):
        x = x.detach().cpu().contiguous()
    source = DTYPE_CODES[x.dtype]
    crc_seed, d, kmax, tables, period, inv, center, scale, raw_limit, lanes = _cached(_ENC_ARGS, config, _encoder_args)
    frame = _C.v2_encode_token_frame(x.data_ptr(), crc_seed, d, kmax, tables, period, inv, center, scale, raw_limit,
                                     source if wire_dtype is None else DTYPE_CODES[wire_dtype], lanes, ids, source,
                                     start, shift)
    return frame if isinstance(frame, bytes) else None
