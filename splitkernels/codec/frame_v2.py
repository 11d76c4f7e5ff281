"""The codec v2 wire frame (docs/FORMATS.md §5.4). The static part (steps, rANS tables) travels
once per session as a :class:`CodecConfigV2`; a frame carries only per-token data, and its CRC
starts from the config's digest, so it checks only against the config it was encoded with.

Layout (little-endian):

    magic "SKTQ" | version u8 = 2 | dtype u8 (bits 0-1, bit 2 step scale, bit 3 center offsets) + coder (bits 4-6)
    [step scale i8] | T varint | escapes varint | raw bitmap ceil(T/8) bytes | [center offsets ceil(d/2) bytes]
    escape values dtype[escapes]
    raw tokens dtype[n_raw * d] | symbol stream of the (T - n_raw) * d coded symbols (the rest)
    crc32 u32 of the config's 32-byte digest followed by every byte before it

A frame of 256 tokens or more whose channels drift from the calibrated centers carries one offset
per channel (§5.4.2, :mod:`.frame_center`), and its values code around the moved centers.

A frame may code with every step scaled by ``2**(g/4)`` (§5.4.3: the edge's rate control); its
``g`` travels in one byte, and the parser hands the rest the config's view at that scale.

A frame of one token (every decode step) takes the **token form** (§5.4.1): one tag byte
(``0b101``, or ``0b110`` and a scale byte; ``0b100`` and ``0b111`` the same with a four-lane
rANS stream; then the coder, shifted, raw and 2-bit dtype fields) replaces magic, version,
dtype byte, T and bitmap, 7 of a one-token frame's 17 framing bytes (0.1 bit per element at
d = 576). The sections after them are the same.

The coder is per frame: 0 static rANS on 1 or 4 lanes (``rans``, smallest: frames of fewer than 2048
values), 6 the same always on 4 lanes (what ``rans`` writes from 2048 values: four state chains
decode 2.5x faster than one, about 9 bytes more), 2 the same on 32 lanes (what ``rans`` writes for
frames of many tokens: 16 lanes per AVX-512 instruction, 2-3x faster, 112 bytes more), 3 the Rice
coder (``rice``, about 0.1 bit per element more on real activations, 2-3x faster again: no table
lookups; long frames), 4 the same Rice codes cut into bit planes (``planes``: 64 symbols per mask
instruction where the CPU has AVX-512 VBMI2), 5 per-channel fixed-width slots (``slots``, about 0.2
bit per element more than Rice, a byte transpose per 8 tokens where the CPU has AVX-512 VBMI2 and
GFNI), 1 the nibble coder (``nibble``, about 0.4 bit per element more, fixed 4-bit slots). The
encoder takes rANS unless asked: ``"rice"``, ``"planes"``, ``"slots"``, ``"nibble"``, or ``"auto"``
for ``choose_coder``'s rule (the Rice coder for long frames). The decoder reads any. Frames written
before the coder field existed have 0 there and read as before.

The parser validates every field and bound before allocating anything sized by the frame (the
largest allocation is bounded by the coder's ``max_symbols`` (``nibble.max_rows``) of the stream plus the
raw section's own bytes) and raises :class:`FrameError` on anything wrong.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .._native import load
from . import frame_center, nibble, planes, rans, rice, slots
from .config_v2 import MAX_FRAME_SCALE, CodecConfigV2
from .frame import CODE_DTYPES, DTYPE_CODES, MAGIC, MAX_T, FrameError, FrameLimits, tensor_bytes

FRAME_VERSION_V2 = 2
HEAD = struct.Struct("<4sBB")
SHIFTED_FLAG = 0x80  # dtype byte: the frame carries a start position and residuals (position shifts)
CENTER_FLAG = 0x08  # dtype byte: the frame carries center offsets (long form only, §5.4.2)
SCALE_FLAG = 0x04  # dtype byte: a step scale byte follows it (§5.4.3)
DTYPE_MASK = 0x03  # dtype byte: the dtype code
# Token form (one token): the tag byte's top three bits (the marker), then the coder, shifted and raw bits and
# the dtype code; a scaled frame's step scale byte follows the tag (§5.4.3).
TOKEN_TAG, TOKEN_TAG_MASK, SCALED_TOKEN_TAG = 0xA0, 0xE0, 0xC0
FOUR_LANE_TOKEN_TAG, SCALED_FOUR_LANE_TOKEN_TAG = 0x80, 0xE0
# marker -> (a step scale byte follows, the rANS stream has four lanes: coder 6)
TOKEN_MARKERS = {TOKEN_TAG: (False, False), SCALED_TOKEN_TAG: (True, False),
                 FOUR_LANE_TOKEN_TAG: (False, True), SCALED_FOUR_LANE_TOKEN_TAG: (True, True)}
TOKEN_CODER, TOKEN_SHIFTED, TOKEN_RAW, TOKEN_DTYPE = 0x10, 0x08, 0x04, 0x03
MAX_POSITION = (1 << 31) - 1
CRC_BYTES = 4
MAX_VARINT_BYTES = 5
CODER_RANS, CODER_NIBBLE, CODER_RANS_WIDE, CODER_RICE, CODER_PLANES, CODER_SLOTS, CODER_RANS_FOUR = 0, 1, 2, 3, 4, 5, 6
# Names a writer takes ("rans": the layout by size).
CODERS = {"rans": CODER_RANS, "nibble": CODER_NIBBLE, "rice": CODER_RICE, "planes": CODER_PLANES,
          "slots": CODER_SLOTS}
# Every id a frame may carry.
CODER_NAMES = {CODER_RANS: "rans", CODER_NIBBLE: "nibble", CODER_RANS_WIDE: "rans32", CODER_RICE: "rice",
               CODER_PLANES: "planes", CODER_SLOTS: "slots", CODER_RANS_FOUR: "rans4"}
# The coders a one-token frame can carry (its tag has one coder bit and the four-lane markers).
TOKEN_FORM_CODERS = (CODER_RANS, CODER_NIBBLE, CODER_RANS_FOUR)
# rans_coder: frames of more than one token and at least this many values take the 32-lane layout,
WIDE_RANS_MIN_SYMBOLS = 1 << 16
# and other frames of at least this many the four-lane layout (one token at d = 4096: decoded in 20 us
# instead of 52 for 9 more bytes, 0.018 bit per element; bench/results/codec_v2/README.md, session 43).
FOUR_LANES_MIN_SYMBOLS = 2048
AUTO = "auto"  # ask for choose_coder's rule
FRAME_CODERS = (*CODERS, AUTO)  # what a frame's writer takes as its coder
# choose_coder: the Rice coder for frames of more than one token and at least this many values
# T * d (a prefill frame; never a one-token decode frame, where bytes matter most and rANS costs
# microseconds) when the tables say it costs at most RICE_MAX_EXTRA_BITS per symbol more than rANS.
FAST_MIN_SYMBOLS = 1 << 16
RICE_MAX_EXTRA_BITS = 0.25

_C, _ = load("_C")


def crc32(parts: list[bytes | memoryview], crc: int = 0) -> int:
    """zlib CRC-32 over ``parts`` in order (the C++ carry-less-multiply CRC when built)."""
    for part in parts:
        if _C is not None and hasattr(_C, "crc32") and len(part) >= 4096:
            view = np.frombuffer(part, dtype=np.uint8)
            crc = _C.crc32(view.ctypes.data, view.shape[0], crc)
        else:
            crc = zlib.crc32(part, crc)
    return crc


def rans_coder(t: int, d: int) -> int:
    """The rANS layout of a frame of ``t`` tokens of ``d`` values: 32 lanes from
    ``WIDE_RANS_MIN_SYMBOLS`` values in frames of several tokens (their 112 extra state bytes are at
    most 0.014 bit per element there, and the C++ coder runs them 2-3x faster), else four lanes from
    ``FOUR_LANES_MIN_SYMBOLS`` values (one state is a serial chain of table lookups, four overlap),
    else one (the token form's tags have no 32-lane layout)."""
    if t > 1 and t * d >= WIDE_RANS_MIN_SYMBOLS:
        return CODER_RANS_WIDE
    return CODER_RANS_FOUR if t * d >= FOUR_LANES_MIN_SYMBOLS else CODER_RANS


def rans_stream_lanes(code: int, coded: int) -> int:
    """Lanes of the rANS stream of ``coded`` symbols written with coder ``code``."""
    if code == CODER_RANS_WIDE:
        return rans.WIDE_LANES
    return rans.LONG_LANES if code == CODER_RANS_FOUR else rans.lanes(coded)


def choose_coder(t: int, d: int, config: CodecConfigV2) -> int:
    """The encoder's rule for a frame of ``t`` tokens of ``d`` values: the Rice coder for long
    frames whose tables suit it (Rice codes fit two-sided geometric tables, as calibrated ones
    are) where this CPU runs its vector path, else rANS (``rans_coder``). Not the bit-plane coder:
    it is at most ~1.3x faster, and only where both ends have AVX-512 VBMI2; a receiver without it
    decodes bit planes at a tenth of the Rice coder's AVX2 speed."""
    if t < 2 or t * d < FAST_MIN_SYMBOLS or not rice.vectorised():
        return rans_coder(t, d)
    return CODER_RICE if config.rice_extra_bits <= RICE_MAX_EXTRA_BITS else rans_coder(t, d)


def resolve_coder(coder: str | None, t: int, d: int, config: CodecConfigV2) -> int:
    """The coder id of ``coder`` for a frame of ``t`` tokens of ``d`` values: "rans" (also None, the
    default: the fewest bytes, ``rans_coder``'s layout), "rice", "planes" or "slots" (rANS for a
    one-token frame), "nibble", or "auto" (``choose_coder``: Rice for long frames whose tables suit it)."""
    if coder is None:
        return rans_coder(t, d)
    if coder == AUTO:
        return choose_coder(t, d, config)
    if coder not in CODERS:
        raise ValueError(f"coder must be one of {sorted(FRAME_CODERS)} or None, got {coder!r}")
    if CODERS[coder] == CODER_RANS or (t == 1 and CODERS[coder] not in TOKEN_FORM_CODERS):
        return rans_coder(t, d)
    return CODERS[coder]


@dataclass
class EncodedV2:
    """One v2-encoded tensor ``[T, d]`` (host tensors).

    ``symbols`` u8 ``[T, d]`` (rows of raw tokens are 0 and not coded), ``raw`` bool ``[T]``,
    ``escapes`` the exact escaped values of the coded tokens in token-major channel order,
    ``raw_values`` ``[n_raw, d]``; both in the input dtype. With a config's position shifts, a
    frame from position ``start`` whose leading rows have a shift > 0 also carries ``residuals``
    i8 ``[T_s, d]``, the low bits of the fine codes of its first ``T_s`` rows (0 at escapes and
    raw rows, docs/FORMATS.md §5.2); else both are None (no row of the frame is shifted). With a
    config's prediction (§5.2.1) ``tokens`` holds the token ids (int64 ``[T]``) and every value
    (symbols, escapes, raw tokens) is of the residual, in fp32; else it is None. ``center_offset``:
    the frame's center offsets (i8 ``[d]``, §5.4.2; every value coded around
    :meth:`center_array`), or None.
    """

    symbols: torch.Tensor
    raw: torch.Tensor
    escapes: torch.Tensor
    raw_values: torch.Tensor
    config: CodecConfigV2
    start: int | None = None
    residuals: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    center_offset: np.ndarray | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.escapes.dtype

    def center_array(self) -> np.ndarray:
        """The centers this tensor's values are coded around (fp32 ``[d]``): the config's, moved by the center offsets."""
        return frame_center.centers(self.config, self.center_offset)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.symbols.shape)

    def to_bytes(self, coder: str | None = None) -> bytes:
        """Serialise into a v2 wire frame; ``coder`` "rans" (default), "rice", "nibble" or "auto" (``choose_coder``)."""
        return write_frame_v2(self, coder)

    @property
    def nbytes(self) -> int:
        """Size of :meth:`to_bytes` (runs the entropy coder)."""
        return len(self.to_bytes())

    @property
    def bits_per_element(self) -> float:
        t, d = self.shape
        return 8.0 * self.nbytes / max(t * d, 1)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_varint(buf: bytes | bytearray | memoryview, pos: int, end: int, what: str) -> tuple[int, int]:
    """Canonical LEB128 (no redundant trailing zero groups), at most 5 bytes, ending before ``end``:
    ``(value, position after it)``; FrameError otherwise."""
    n = shift = 0
    for i in range(MAX_VARINT_BYTES):
        if pos + i >= end:
            raise FrameError(f"frame truncated inside {what}")
        b = buf[pos + i]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            if i and b == 0:
                raise FrameError(f"{what} is not minimally encoded")
            return n, pos + i + 1
    raise FrameError(f"{what} is longer than {MAX_VARINT_BYTES} bytes")


def flat_frame(data) -> bytes | bytearray | memoryview | None:
    """``data`` as a flat byte buffer for the C++ fast paths, or None when it is not bytes, a
    bytearray or a contiguous memoryview (the reference parser then decides)."""
    if isinstance(data, memoryview):
        return data.cast("B") if data.c_contiguous else None
    return data if isinstance(data, (bytes, bytearray)) else None


def escape_limit(limits: FrameLimits | None, d: int, dtype: torch.dtype, t: int) -> int | None:
    """The escape count a C++ fast path may accept (-1: any) in a frame of ``t`` tokens of ``d``
    values of ``dtype`` under the receiver's ``limits``; None when the header is already beyond
    them (the reference parser then raises the limit's error)."""
    if limits is None:
        return -1
    if ((limits.d is not None and limits.d != d) or (limits.dtypes is not None and dtype not in limits.dtypes)
            or (limits.max_tokens is not None and t > limits.max_tokens)):
        return None
    return -1 if limits.max_outliers is None else limits.max_outliers


def is_token_tag(first_byte: int) -> bool:
    """True when a frame's first byte is a token-form tag (§5.4.1), of any marker."""
    return first_byte & TOKEN_TAG_MASK in TOKEN_MARKERS


def token_marker(scaled: bool, code: int) -> int:
    """The token-form marker of a frame with or without a step scale byte and coder ``code``."""
    four = code == CODER_RANS_FOUR
    return next(m for m, flags in TOKEN_MARKERS.items() if flags == (scaled, four))


def read_scale(byte: int, config: CodecConfigV2) -> CodecConfigV2:
    """The frame view of ``config`` for a frame's step scale byte (§5.4.3); FrameError when the
    scale is 0 (a frame without a scale has no byte), out of range, or makes a step invalid."""
    scale = byte - 256 if byte >= 128 else byte
    if scale == 0 or not -MAX_FRAME_SCALE <= scale <= MAX_FRAME_SCALE:
        raise FrameError(f"frame step scale {scale} is not in [-{MAX_FRAME_SCALE}, {MAX_FRAME_SCALE}] without 0")
    try:
        return config.scaled(scale)
    except ValueError as exc:
        raise FrameError(str(exc)) from None


def framing_bytes(t: int, escapes: int | None = None, start: int | None = None, id_bits: int = 0) -> int:
    """Bytes of a frame that are neither symbols, escape values, raw tokens nor residuals (header,
    bitmap, CRC; the tag and CRC of a one-token frame), with the escape count's varint when
    ``escapes`` is given (else the caller counts it), the start position's varint when
    ``start`` is given (a frame with shifted rows) and the token ids at ``id_bits`` each (a
    config's prediction)."""
    count = 0 if escapes is None else len(_varint(escapes))
    position = 0 if start is None else len(_varint(start))
    ids = (t * id_bits + 7) // 8
    if t == 1:
        return 1 + position + count + ids + CRC_BYTES
    return HEAD.size + len(_varint(t)) + position + count + ids + (t + 7) // 8 + CRC_BYTES


def scale_bytes(config: CodecConfigV2) -> bytes:
    """The step scale byte of a frame coded with ``config`` (§5.4.3), or nothing at scale 0."""
    return bytes([config.frame_scale & 0xFF]) if config.frame_scale else b""


def write_frame_v2(enc: EncodedV2, coder: str | None = None) -> bytes:
    cfg = enc.config
    t, d = enc.shape
    raw = enc.raw.numpy().astype(bool)
    n_raw = int(raw.sum())
    code = resolve_coder(coder, t, d, cfg)
    symbols = enc.symbols.numpy()
    if code == CODER_NIBBLE:  # skips raw rows itself
        stream = nibble.encode(symbols, raw if n_raw else None, cfg.freqs)
    elif code == CODER_PLANES:  # so do these
        stream = planes.encode(symbols, raw if n_raw else None, *cfg.rice_params, len(cfg.freqs))
    elif code == CODER_SLOTS:
        stream = slots.encode(symbols, raw if n_raw else None, *cfg.slot_params, len(cfg.freqs))
    else:
        coded = symbols[~raw] if n_raw else symbols
        stream = (rice.encode(coded, *cfg.rice_params, len(cfg.freqs)) if code == CODER_RICE
                  else rans.encode(coded, cfg.rans_tables, rans_stream_lanes(code, coded.size)))
    shifted = None
    if enc.residuals is not None:
        shifted = (enc.start, pack_residuals(enc.residuals.numpy(), cfg.row_shifts(enc.start, t, enc.tokens), raw))
    return assemble_frame(cfg, code, t, raw, enc.escapes, enc.raw_values, stream, shifted, enc.tokens,
                          enc.center_offset)


def _shift_runs(shifts: np.ndarray, raw: np.ndarray) -> list[tuple[int, int, int]]:
    """``(first row, end row, shift)`` of the runs of equal shift > 0 among the shifted rows, raw
    rows left out: the rows whose residuals a frame carries, in order."""
    runs: list[tuple[int, int, int]] = []
    for i, s in enumerate(shifts.tolist()):
        if s == 0 or raw[i]:
            continue
        if runs and runs[-1][1] == i and runs[-1][2] == s:
            runs[-1] = (runs[-1][0], i + 1, s)
        else:
            runs.append((i, i + 1, s))
    return runs


def residual_bytes(shifts: np.ndarray, raw: np.ndarray, d: int) -> int:
    """Size of the residual section: ``shift`` bits per value of every shifted coded row, padded to a byte."""
    return (sum((b - a) * s for a, b, s in _shift_runs(shifts, raw)) * d + 7) // 8


def pack_residuals(residuals: np.ndarray, shifts: np.ndarray, raw: np.ndarray) -> bytes:
    """The residual section: each residual ``r`` of a row with shift ``s`` as the ``s``-bit field
    ``r + 2**(s-1)``, least significant bit first, row-major, rows in order, zero-padded to a byte."""
    bits = [((residuals[a:b].astype(np.int32) + (1 << (s - 1)))[..., None] >> np.arange(s)).astype(np.uint8).reshape(-1) & 1
            for a, b, s in _shift_runs(shifts, raw)]
    return np.packbits(np.concatenate(bits), bitorder="little").tobytes() if bits else b""


def unpack_residuals(section: memoryview, shifts: np.ndarray, raw: np.ndarray, d: int) -> np.ndarray:
    """The residuals i8 ``[len(shifts), d]`` of a residual section (0 in unshifted and raw rows);
    FrameError if a padding bit is set."""
    out = np.zeros((shifts.shape[0], d), dtype=np.int8)
    bits = np.unpackbits(np.frombuffer(section, dtype=np.uint8), bitorder="little")
    at = 0
    for a, b, s in _shift_runs(shifts, raw):
        n = (b - a) * d * s
        fields = bits[at : at + n].reshape(b - a, d, s).astype(np.int32) << np.arange(s)
        out[a:b] = fields.sum(-1) - (1 << (s - 1))
        at += n
    if bits[at:].any():
        raise FrameError("residual section has padding bits set")
    return out


def assemble_frame(config: CodecConfigV2, code: int, t: int, raw: np.ndarray, escapes: torch.Tensor,
                   raw_values: torch.Tensor, stream: bytes | memoryview,
                   shifted: tuple[int, bytes] | None = None, tokens: torch.Tensor | None = None,
                   offsets: np.ndarray | None = None) -> bytes:
    """The frame bytes around an already coded symbol ``stream`` (header, sections, CRC; the token
    form when ``t`` is 1); ``shifted``: the start position and packed residual section of a frame
    with shifted rows; ``tokens``: the token ids, which a config with a prediction needs;
    ``offsets``: the frame's center offsets (long frames only)."""
    if (config.prediction is not None) != (tokens is not None):
        raise ValueError("a frame carries token ids exactly when its codec config has a prediction")
    if offsets is not None and (t == 1 or not np.asarray(offsets).any()):
        raise ValueError("center offsets travel only in long frames, and only when one is not 0")
    scale = scale_bytes(config)
    if t == 1:
        if code not in TOKEN_FORM_CODERS:
            raise ValueError(f"a one-token frame cannot carry the {CODER_NAMES[code]} coder (its tag has one coder bit)")
        head = [bytes([token_marker(bool(scale), code) | (TOKEN_CODER if code == CODER_NIBBLE else 0)
                       | (0 if shifted is None else TOKEN_SHIFTED) | (TOKEN_RAW if raw[0] else 0)
                       | DTYPE_CODES[escapes.dtype]]), scale]
    else:
        flag = (0 if shifted is None else SHIFTED_FLAG) | (0 if offsets is None else CENTER_FLAG) | (SCALE_FLAG if scale else 0)
        head = [HEAD.pack(MAGIC, FRAME_VERSION_V2, DTYPE_CODES[escapes.dtype] | code << 4 | flag), scale, _varint(t)]
    parts = [
        *head,
        *([] if shifted is None else [_varint(shifted[0])]),
        _varint(int(escapes.numel())),
        *([] if tokens is None else [config.prediction.pack_ids(tokens)]),
        *([] if t == 1 else [np.packbits(raw, bitorder="little").tobytes()]),
        *([] if offsets is None else [frame_center.pack(offsets)]),
        tensor_bytes(escapes),
        tensor_bytes(raw_values),
        *([] if shifted is None else [shifted[1]]),
        stream,
    ]
    parts.append(struct.pack("<I", crc32(parts, config.crc_seed)))
    return b"".join(parts)


def _values(raw_bytes: memoryview, dtype: torch.dtype, what: str) -> torch.Tensor:
    vals = torch.frombuffer(bytearray(raw_bytes), dtype=torch.uint8).view(dtype) if len(raw_bytes) else torch.empty(0, dtype=dtype)
    if not torch.isfinite(vals).all():
        raise FrameError(f"{what}: a value is not finite")
    return vals


@dataclass
class ParsedV2:
    """A v2 frame whose header, sections and CRC are validated; the symbol stream is not decoded yet."""

    t: int
    dtype: torch.dtype
    coder: int
    raw: np.ndarray  # bool [T]
    escapes: torch.Tensor  # exact values, checked finite
    raw_bytes: memoryview  # n_raw * d values of dtype, not yet checked
    stream: memoryview
    start: int | None = None  # set when the frame has shifted rows
    residual_section: memoryview | None = None
    tokens: torch.Tensor | None = None  # the token ids, with a config's prediction
    center_offset: np.ndarray | None = None  # i8 [d], when the frame carries center offsets
    scale: int = 0  # the frame's step scale (§5.4.3)

    @property
    def n_raw(self) -> int:
        return int(np.count_nonzero(self.raw))

    def raw_values(self, d: int) -> torch.Tensor:
        """The raw tokens ``[n_raw, d]``; FrameError if a value is not finite."""
        return _values(self.raw_bytes, self.dtype, "raw tokens").reshape(self.n_raw, d)


def parse_frame_v2(data: bytes | bytearray | memoryview, config: CodecConfigV2 | None,
                   limits: FrameLimits | None = None) -> ParsedV2:
    """Validate a v2 frame's header, section sizes and CRC against the session's ``config``
    (:class:`FrameError` if anything is wrong); the symbol stream is left for the caller to decode.

    ``limits``: the receiver's limits (d, dtypes, most tokens, most escapes as outliers), checked
    against the header before anything sized by it is allocated (:class:`FrameLimitError`)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FrameError(f"a frame must be bytes, got {type(data).__name__}")
    if config is None:
        raise FrameError("a v2 frame needs the session's CodecConfigV2 (config=...) to be decoded")
    if not isinstance(config, CodecConfigV2):
        raise FrameError(f"config must be a CodecConfigV2 for a v2 frame, got {type(config).__name__}")
    buf = memoryview(data).cast("B")
    token = len(buf) > 0 and is_token_tag(buf[0])
    least = 1 + 1 + CRC_BYTES if token else HEAD.size + 2 + CRC_BYTES
    if len(buf) < least:
        raise FrameError(f"frame truncated: {len(buf)} bytes, a v2 {'token ' if token else ''}header needs at least {least}")
    centered = False
    if token:  # §5.4.1: T = 1, the raw flag in the tag instead of a bitmap
        tag = buf[0]
        dtype_code, coder, shifted = tag & TOKEN_DTYPE, int(bool(tag & TOKEN_CODER)), bool(tag & TOKEN_SHIFTED)
        (scaled, four), pos = TOKEN_MARKERS[tag & TOKEN_TAG_MASK], 1
        if four:
            if coder == CODER_NIBBLE:
                raise FrameError("a four-lane token tag cannot name the nibble coder")
            coder = CODER_RANS_FOUR
    else:
        magic, version, dtype_byte = HEAD.unpack_from(buf, 0)
        dtype_code, coder, shifted = dtype_byte & DTYPE_MASK, (dtype_byte & 0x7F) >> 4, bool(dtype_byte & SHIFTED_FLAG)
        centered, scaled, pos = bool(dtype_byte & CENTER_FLAG), bool(dtype_byte & SCALE_FLAG), HEAD.size
        if magic != MAGIC:
            raise FrameError(f"not a codec frame (magic {bytes(magic)!r}, expected {MAGIC!r})")
        if version != FRAME_VERSION_V2:
            raise FrameError(f"frame version {version} is not a v2 frame")
    if dtype_code not in CODE_DTYPES:
        raise FrameError(f"unknown dtype code {dtype_code}")
    if coder not in CODER_NAMES:
        raise FrameError(f"unknown symbol coder {coder} (0 rANS, 1 nibble, 2 rANS on 32 lanes, 3 Rice, 4 bit planes, "
                         f"5 slots, 6 rANS on 4 lanes)")
    crc_at = len(buf) - CRC_BYTES
    (crc,) = struct.unpack_from("<I", buf, crc_at)
    if crc32([buf[:crc_at]], config.crc_seed) != crc:
        raise FrameError(f"frame CRC mismatch: corrupted, truncated, or encoded with another codec config than "
                         f"{config.fingerprint[:8]}")

    dtype = CODE_DTYPES[dtype_code]
    item = dtype.itemsize
    d = config.d
    if scaled:  # every step below is the frame's (§5.4.3)
        if pos >= crc_at:
            raise FrameError("frame truncated inside the step scale")
        config = read_scale(buf[pos], config)
        pos += 1
    t, pos = (1, pos) if token else read_varint(buf, pos, crc_at, "T")
    start = None
    if shifted:
        start, pos = read_varint(buf, pos, crc_at, "start position")
        if not config.shift_end:
            raise FrameError(f"frame has shifted rows but the codec config {config.fingerprint[:8]} has no position or "
                             f"token shifts")
        if start > MAX_POSITION:
            raise FrameError(f"frame claims start position {start}, more than {MAX_POSITION}")
    n_esc, pos = read_varint(buf, pos, crc_at, "escape count")
    if t > MAX_T:
        raise FrameError(f"frame claims T = {t} tokens, more than {MAX_T}")
    if limits is not None:
        limits.check(t, d, dtype, n_esc)

    def take(n: int, what: str) -> memoryview:
        nonlocal pos
        if pos + n > crc_at:
            raise FrameError(f"frame truncated: {what} needs {n} bytes at offset {pos}, frame body ends at {crc_at}")
        view = buf[pos : pos + n]
        pos += n
        return view

    tokens = None
    if config.prediction is not None:
        tokens, wrong = config.prediction.unpack_ids(take(config.prediction.id_bytes(t), "token ids"), t)
        if wrong:
            raise FrameError(wrong)
    if token:
        raw = np.array([bool(buf[0] & TOKEN_RAW)])
    else:
        bitmap = np.frombuffer(take((t + 7) // 8, "raw bitmap"), dtype=np.uint8)
        raw = np.unpackbits(bitmap, bitorder="little")[:t].astype(bool)
        if t % 8 and int(bitmap[-1]) >> (t % 8):
            raise FrameError("raw bitmap has bits set beyond T")
    offsets = None
    if centered:
        if t == 1:
            raise FrameError("a one-token frame carries no center offsets")
        offsets, wrong = frame_center.unpack(take(frame_center.section_bytes(d), "center offsets"), d)
        if wrong:
            raise FrameError(wrong)
        if not np.isfinite(frame_center.centers(config, offsets)).all():
            raise FrameError("a center offset moves a center beyond the fp32 range")
    n_raw = int(np.count_nonzero(raw))
    n_sym = (t - n_raw) * d
    if n_esc > n_sym:
        raise FrameError(f"frame claims {n_esc} escapes for {n_sym} coded values")
    escapes = _values(take(n_esc * item, "escape values"), dtype, "escape values")
    raw_bytes = take(n_raw * d * item, "raw tokens")
    section = None
    if shifted:
        shifts = config.row_shifts(start, t, tokens)
        section = take(residual_bytes(shifts, raw[: shifts.shape[0]], d), "residual section")
    if coder in (CODER_NIBBLE, CODER_SLOTS):
        most = (nibble.max_rows(crc_at - pos, d) if coder == CODER_NIBBLE
                else slots.max_rows(crc_at - pos, config.slot_row_bits))
        if t - n_raw > most:
            raise FrameError(f"frame claims {t - n_raw} coded tokens, more than a {crc_at - pos}-byte stream can hold")
    elif n_sym > {CODER_RICE: rice.max_symbols, CODER_PLANES: planes.max_symbols}.get(coder, rans.max_symbols)(crc_at - pos):
        raise FrameError(f"frame claims {n_sym} coded values, more than a {crc_at - pos}-byte stream can hold")
    return ParsedV2(t, dtype, coder, raw, escapes, raw_bytes, buf[pos:crc_at], start, section, tokens, offsets,
                    config.frame_scale)


def read_frame_v2(data: bytes | bytearray | memoryview, config: CodecConfigV2 | None,
                  limits: FrameLimits | None = None) -> EncodedV2:
    """Parse and validate a v2 frame and decode its symbols (:func:`parse_frame_v2`); FrameError if anything is wrong."""
    return decode_symbols(parse_frame_v2(data, config, limits), config)


def decode_symbols(p: ParsedV2, config: CodecConfigV2) -> EncodedV2:
    """The :class:`EncodedV2` of a parsed frame (its values coded with ``config`` at the frame's step
    scale): its symbol stream decoded and checked; FrameError if invalid."""
    config = config.scaled(p.scale)  # checked by the parser
    d, t, raw, n_raw = config.d, p.t, p.raw, p.n_raw
    raw_t = torch.from_numpy(raw)
    if p.coder == CODER_NIBBLE:
        try:
            sym, n_esc_sym = nibble.decode(p.stream, config.freqs, raw, d, count_of=config.escape_symbol)
        except nibble.NibbleError as exc:
            raise FrameError(f"symbol stream invalid: {exc}") from None
        symbols = torch.from_numpy(sym)
    elif p.coder in (CODER_PLANES, CODER_SLOTS):
        coder, params = (planes, config.rice_params) if p.coder == CODER_PLANES else (slots, config.slot_params)
        try:
            sym, n_esc_sym = coder.decode(p.stream, raw, *params, len(config.freqs), d, count_of=config.escape_symbol)
        except (planes.PlanesError, slots.SlotsError) as exc:
            raise FrameError(f"symbol stream invalid: {exc}") from None
        symbols = torch.from_numpy(sym)
    else:
        try:
            if p.coder == CODER_RICE:
                sym, n_esc_sym = rice.decode(p.stream, (t - n_raw) * d, *config.rice_params, len(config.freqs),
                                             count_of=config.escape_symbol)
            else:
                sym, n_esc_sym = rans.decode(p.stream, config.rans_tables, (t - n_raw) * d,
                                             count_of=config.escape_symbol,
                                             n_lanes=rans_stream_lanes(p.coder, (t - n_raw) * d))
        except (rans.RansError, rice.RiceError) as exc:
            raise FrameError(f"symbol stream invalid: {exc}") from None
        if n_raw:
            symbols = torch.zeros(t, d, dtype=torch.uint8)
            symbols[~raw_t] = torch.from_numpy(sym).reshape(t - n_raw, d)
        else:
            symbols = torch.from_numpy(sym).reshape(t, d)
    if n_esc_sym != p.escapes.numel():
        raise FrameError(f"escape count {p.escapes.numel()} does not match the escape symbols in the stream")
    residuals = None
    if p.residual_section is not None:
        shifts = config.row_shifts(p.start, t, p.tokens)
        res = unpack_residuals(p.residual_section, shifts, raw[: shifts.shape[0]], d)
        if (res[symbols[: shifts.shape[0]].numpy() == config.escape_symbol] != 0).any():
            raise FrameError("residual of an escaped value is not 0")
        residuals = torch.from_numpy(res)
    return EncodedV2(symbols, raw_t, p.escapes, p.raw_values(d), config, p.start, residuals, p.tokens, p.center_offset)
