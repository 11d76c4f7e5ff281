"""Edge <-> server messages as bytes: a fixed ``struct`` header, a fixed ``struct`` body per kind,
and, for a step, the codec frame verbatim. Nothing is pickled; every length is checked.

Header (little-endian, 20 bytes)::

    magic "SKRP" | version u8 | kind u8 | flags u16 (0) | session id u64 | payload length u32

Kinds and payloads:

* OPEN (edge -> server): model fingerprint 16 bytes | do_sample u8 | temperature f64 | top_k u32 |
  top_p f64 | has_seed u8 | seed i64 | max_len u32 (prompt + new tokens the edge will send, 0 = unsaid);
  with header flag ``FLAG_CODEC_CONFIG`` (bit 0, OPEN only) then: SHA-256 of the config 32 bytes |
  the session's codec v2 config in its canonical bytes (docs/FORMATS.md §5.1), the rest of the
  payload. A receiver that predates the flag refuses such an OPEN ("unknown message flags").
* OPENED (server -> edge): max_seq_len u32 (the server's limit for this session)
* STEP (edge -> server): seq u32 | codec frame (docs/FORMATS.md)
* TOKEN (server -> edge): seq u32 | token u32 | position u32 (tokens the server has seen) |
  decode seconds f32 | server compute seconds f32 | session KV bytes u64
* CLOSE (edge -> server): empty
* VERIFY (edge -> server): seq u32 | drafts u16 (k) | reserved u16 (0) | k draft token ids u32 |
  codec frame of n >= k + 1 rows whose last k rows are the drafts (speculative decoding: the
  server scores the drafts and keeps the accepted ones in its KV cache)
* VERDICT (server -> edge): seq u32 | accepted u16 | token u32 | position u32 | decode seconds f32 |
  server compute seconds f32 | session KV bytes u64 (``token`` follows the accepted drafts)
"""
from __future__ import annotations

import enum
import hashlib
import math
import struct
from dataclasses import dataclass

MAGIC = b"SKRP"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<4sBBHQI")
FINGERPRINT_BYTES = 16
FLAG_CODEC_CONFIG = 0x1  # OPEN carries a codec config after its fixed fields
DIGEST_BYTES = 32
_OPEN = struct.Struct("<16sBdIdBqI")
_OPENED = struct.Struct("<I")
_STEP = struct.Struct("<I")
_TOKEN = struct.Struct("<IIIffQ")
_VERIFY = struct.Struct("<IHH")
_VERDICT = struct.Struct("<IHIIffQ")
MAX_DRAFTS = 2**16 - 1


class Kind(enum.IntEnum):
    OPEN = 1
    OPENED = 2
    STEP = 3
    TOKEN = 4
    CLOSE = 5
    VERIFY = 6
    VERDICT = 7


class Status(enum.Enum):
    """Error classes, named as the gRPC status codes they travel as."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"


class SplitError(RuntimeError):
    """A request failed on the server (or on its way); ``status`` says why."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(f"{status.value}: {message}")
        self.status = status
        self.message = message


class ProtocolError(SplitError):
    """A message is malformed (always INVALID_ARGUMENT)."""

    def __init__(self, message: str) -> None:
        super().__init__(Status.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class SamplingParams:
    """How the server picks the next token: greedy, or temperature/top-k/top-p sampling."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k < 2**32:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -2**63 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or a 64-bit int, got {self.seed!r}")


@dataclass(frozen=True)
class Open:
    """Open a session. ``codec_config``: the session's static codec v2 config as its canonical
    bytes (:meth:`splitkernels.codec.CodecConfigV2.canonical_bytes`), or empty (v1 frames only);
    the server decodes the session's v2 frames with it."""

    sampling: SamplingParams
    fingerprint: bytes = bytes(FINGERPRINT_BYTES)
    max_len: int = 0
    session_id: int = 0
    codec_config: bytes = b""


@dataclass(frozen=True)
class Opened:
    session_id: int
    max_seq_len: int


@dataclass(frozen=True)
class Step:
    session_id: int
    seq: int
    frame: bytes | memoryview  # parsed: a view into the message, so a large frame is not copied


@dataclass(frozen=True)
class TokenReply:
    session_id: int
    seq: int
    token: int
    position: int
    decode_s: float
    compute_s: float
    kv_bytes: int


@dataclass(frozen=True)
class Close:
    session_id: int


@dataclass(frozen=True)
class Verify:
    """A multi-token step: ``frame`` holds n rows, the last ``len(drafts)`` of them the edge's
    draft tokens (whose ids are ``drafts``), the rows before them tokens already decided."""

    session_id: int
    seq: int
    drafts: tuple[int, ...]
    frame: bytes


@dataclass(frozen=True)
class Verdict:
    """How many drafts the server accepted, and the token it chose after them."""

    session_id: int
    seq: int
    accepted: int
    token: int
    position: int
    decode_s: float
    compute_s: float
    kv_bytes: int


Message = Open | Opened | Step | TokenReply | Close | Verify | Verdict


def _header(kind: Kind, session_id: int, payload: bytes, flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, flags, session_id, len(payload)) + payload


def encode_message(msg: Message) -> bytes:
    """Serialise one message (header + payload)."""
    if isinstance(msg, Open):
        s = msg.sampling
        if len(msg.fingerprint) != FINGERPRINT_BYTES:
            raise ValueError(f"fingerprint must be {FINGERPRINT_BYTES} bytes, got {len(msg.fingerprint)}")
        body = _OPEN.pack(msg.fingerprint, int(s.do_sample), s.temperature, s.top_k, s.top_p,
                          int(s.seed is not None), s.seed or 0, msg.max_len)
        if not msg.codec_config:
            return _header(Kind.OPEN, msg.session_id, body)
        config = bytes(msg.codec_config)
        return _header(Kind.OPEN, msg.session_id, body + hashlib.sha256(config).digest() + config, FLAG_CODEC_CONFIG)
    if isinstance(msg, Opened):
        return _header(Kind.OPENED, msg.session_id, _OPENED.pack(msg.max_seq_len))
    if isinstance(msg, Step):
        return _header(Kind.STEP, msg.session_id, _STEP.pack(msg.seq) + bytes(msg.frame))
    if isinstance(msg, TokenReply):
        return _header(Kind.TOKEN, msg.session_id, _TOKEN.pack(msg.seq, msg.token, msg.position, msg.decode_s,
                                                              msg.compute_s, msg.kv_bytes))
    if isinstance(msg, Close):
        return _header(Kind.CLOSE, msg.session_id, b"")
    if isinstance(msg, Verify):
        if len(msg.drafts) > MAX_DRAFTS:
            raise ValueError(f"drafts must hold at most {MAX_DRAFTS} tokens, got {len(msg.drafts)}")
        body = _VERIFY.pack(msg.seq, len(msg.drafts), 0) + struct.pack(f"<{len(msg.drafts)}I", *msg.drafts)
        return _header(Kind.VERIFY, msg.session_id, body + bytes(msg.frame))
    if isinstance(msg, Verdict):
        return _header(Kind.VERDICT, msg.session_id, _VERDICT.pack(msg.seq, msg.accepted, msg.token, msg.position,
                                                                  msg.decode_s, msg.compute_s, msg.kv_bytes))
    raise TypeError(f"msg must be a protocol message, got {type(msg).__name__}")


def _fixed(body: memoryview, layout: struct.Struct, kind: Kind) -> tuple:
    if len(body) != layout.size:
        raise ProtocolError(f"{kind.name} payload must be {layout.size} bytes, got {len(body)}")
    return layout.unpack(body)


def decode_message(data: bytes | bytearray | memoryview) -> Message:
    """Parse one message; :class:`ProtocolError` on anything malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"a message must be bytes, got {type(data).__name__}")
    buf = memoryview(data)
    if len(buf) < HEADER.size:
        raise ProtocolError(f"message truncated: {len(buf)} bytes, the header needs {HEADER.size}")
    magic, version, kind, flags, session_id, length = HEADER.unpack(buf[: HEADER.size])
    if magic != MAGIC:
        raise ProtocolError(f"not a runtime message (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})")
    if flags & ~FLAG_CODEC_CONFIG or (flags and kind != Kind.OPEN):
        raise ProtocolError(f"unknown message flags {flags:#x}")
    if length != len(buf) - HEADER.size:
        raise ProtocolError(f"payload length {length} does not match the {len(buf) - HEADER.size} bytes received")
    try:
        kind = Kind(kind)
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind}") from None
    body = buf[HEADER.size:]
    if kind == Kind.OPEN:
        codec_config = b""
        if flags & FLAG_CODEC_CONFIG:
            body, codec_config = body[: _OPEN.size], body[_OPEN.size:]
            if len(codec_config) <= DIGEST_BYTES:
                raise ProtocolError("OPEN codec config truncated: it needs a 32-byte digest and the config bytes")
            digest, codec_config = bytes(codec_config[:DIGEST_BYTES]), bytes(codec_config[DIGEST_BYTES:])
            if hashlib.sha256(codec_config).digest() != digest:
                raise ProtocolError("OPEN codec config does not match its SHA-256 digest (corrupted)")
        fp, do_sample, temperature, top_k, top_p, has_seed, seed, max_len = _fixed(body, _OPEN, kind)
        if do_sample > 1 or has_seed > 1:
            raise ProtocolError("OPEN flags must be 0 or 1")
        try:
            sampling = SamplingParams(bool(do_sample), temperature, top_k, top_p, seed if has_seed else None)
        except ValueError as exc:
            raise ProtocolError(f"bad sampling parameters: {exc}") from None
        return Open(sampling, bytes(fp), max_len, session_id, codec_config)
    if kind == Kind.OPENED:
        return Opened(session_id, *_fixed(body, _OPENED, kind))
    if kind == Kind.STEP:
        if len(body) < _STEP.size:
            raise ProtocolError("STEP payload truncated")
        (seq,) = _STEP.unpack(body[: _STEP.size])
        return Step(session_id, seq, body[_STEP.size:])
    if kind == Kind.TOKEN:
        return TokenReply(session_id, *_fixed(body, _TOKEN, kind))
    if kind == Kind.VERIFY:
        if len(body) < _VERIFY.size:
            raise ProtocolError("VERIFY payload truncated")
        seq, count, reserved = _VERIFY.unpack(body[: _VERIFY.size])
        if reserved != 0:
            raise ProtocolError(f"VERIFY reserved field must be 0, got {reserved}")
        end = _VERIFY.size + 4 * count
        if len(body) < end:
            raise ProtocolError(f"VERIFY payload truncated: {count} draft ids need {4 * count} bytes")
        drafts = struct.unpack(f"<{count}I", body[_VERIFY.size:end])
        return Verify(session_id, seq, drafts, bytes(body[end:]))
    if kind == Kind.VERDICT:
        return Verdict(session_id, *_fixed(body, _VERDICT, kind))
    _fixed(body, struct.Struct(""), kind)
    return Close(session_id)
