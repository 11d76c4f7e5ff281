"""The codec frame: one self-describing, CRC-protected binary message per tensor.

Layout (little-endian; docs/FORMATS.md is the normative description):

    magic "SKTQ" | version u8 | dtype u8 | flags u8 | reserved u8 | T u32 | d u32 | outliers u32
    bits u8[T] | step f16[T] | lo f16[T] | count u16/u32[T]
    index u16/u32[outliers] | value dtype[outliers]
    per-token bit streams, each ceil(d*bits/8) bytes (raw tokens: d values in dtype)
    crc32 u32 of every byte before it

The parser checks the header against the receiver's :class:`FrameLimits` (expected d, dtypes,
token and outlier counts) and the frame's length against the sizes the header implies before it
reads further, then every width, count, index and the CRC before it allocates anything sized by
the frame, and raises :class:`FrameError`; it never unpickles. Its own allocations stay
proportional to the frame's size (no arrays sized ``T x d``).
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

MAGIC = b"SKTQ"
FRAME_VERSION = 1
HEADER = struct.Struct("<4sBBBBIII")
CRC_BYTES = 4
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
# Sanity bounds that stop a forged header from making the parser allocate without limit.
MAX_D = 1 << 24
MAX_T = 1 << 24


class FrameError(ValueError):
    """A codec frame is malformed, truncated, extended, corrupted or of an unknown version."""


class FrameLimitError(FrameError):
    """A well-formed header asks for more than the receiver accepts; ``field`` names what:
    ``"d"``, ``"dtype"``, ``"tokens"`` or ``"outliers"``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class FrameLimits:
    """What a receiver accepts, checked against the header before anything is allocated.

    ``d``: the expected hidden size (None = any up to ``MAX_D``); ``dtypes``: accepted value
    dtypes (None = all three); ``max_tokens``/``max_outliers``: most tokens / outliers per frame.
    """

    d: int | None = None
    dtypes: frozenset[torch.dtype] | None = None
    max_tokens: int | None = None
    max_outliers: int | None = None

    def check(self, t: int, d: int, dtype: torch.dtype, total: int) -> None:
        """Raise :class:`FrameLimitError` naming the first header field beyond these limits."""
        if self.d is not None and d != self.d:
            raise FrameLimitError("d", f"frame has d={d}, the receiver expects d={self.d}")
        if self.dtypes is not None and dtype not in self.dtypes:
            raise FrameLimitError("dtype", f"frame dtype {dtype} is not accepted (accepted: {sorted(map(str, self.dtypes))})")
        if self.max_tokens is not None and t > self.max_tokens:
            raise FrameLimitError("tokens", f"frame holds {t} tokens, the receiver accepts at most {self.max_tokens}")
        if self.max_outliers is not None and total > self.max_outliers:
            raise FrameLimitError("outliers", f"frame holds {total} outliers, the receiver accepts at most {self.max_outliers}")


def count_width(d: int) -> int:
    """Bytes of a per-token outlier count (u16 while a count <= d fits)."""
    return 2 if d <= 0xFFFF else 4


def index_width(d: int) -> int:
    """Bytes of an outlier channel index (u16 for d <= 65536)."""
    return 2 if d <= 0x10000 else 4


def stream_nbytes(bits: np.ndarray, d: int, raw_bits: int) -> np.ndarray:
    """Bytes of each token's stream: ceil(d*b/8); raw tokens carry d values of ``raw_bits``."""
    b = bits.astype(np.int64)
    return np.where(b == raw_bits, d * raw_bits // 8, (d * b + 7) // 8)


def frame_nbytes(t: int, d: int, dtype: torch.dtype, total_outliers: int, stream_bytes: int) -> int:
    """Exact frame size for the given contents (used for bits-per-element and budgets)."""
    value_bytes = torch.empty((), dtype=dtype).element_size()
    per_token = 1 + 2 + 2 + count_width(d)
    return HEADER.size + t * per_token + total_outliers * (index_width(d) + value_bytes) + stream_bytes + CRC_BYTES


@dataclass
class FrameContents:
    """Compact (host) arrays of one frame."""

    dtype: torch.dtype
    d: int
    bits: np.ndarray  # u8 [T]
    step: np.ndarray  # f16 [T]
    lo: np.ndarray  # f16 [T]
    counts: np.ndarray  # int64 [T]
    indices: np.ndarray  # integer [total] (int32 when parsed)
    values: torch.Tensor  # dtype [total]
    streams: np.ndarray  # u8 [sum of stream bytes]


def byte_view(t: torch.Tensor) -> np.ndarray:
    """The bytes of host tensor ``t`` of any dtype (bf16 too, which numpy lacks) in row-major order,
    as u8 (a view where ``t`` is contiguous). Reshaped before the dtype view: a [k, 1] view may keep
    a stride that the byte view rejects."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def tensor_bytes(t: torch.Tensor) -> bytes:
    """:func:`byte_view` as bytes (b"" at once when empty: most frames have no raw tokens)."""
    return b"" if t.numel() == 0 else byte_view(t).tobytes()


def write_frame(c: FrameContents) -> bytes:
    t = c.bits.shape[0]
    cw, iw = count_width(c.d), index_width(c.d)
    parts = [
        HEADER.pack(MAGIC, FRAME_VERSION, DTYPE_CODES[c.dtype], 0, 0, t, c.d, int(c.indices.shape[0])),
        c.bits.astype("<u1").tobytes(),
        c.step.astype("<f2").tobytes(),
        c.lo.astype("<f2").tobytes(),
        c.counts.astype("<u2" if cw == 2 else "<u4").tobytes(),
        c.indices.astype("<u2" if iw == 2 else "<u4").tobytes(),
        tensor_bytes(c.values.cpu()),
        c.streams.tobytes(),
    ]
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


class _Reader:
    def __init__(self, buf: memoryview, end: int) -> None:
        self.buf, self.pos, self.end = buf, HEADER.size, end

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.end:
            raise FrameError(f"frame truncated: {what} needs {n} bytes at offset {self.pos}, frame body ends at {self.end}")
        view = self.buf[self.pos : self.pos + n]
        self.pos += n
        return view


def _size_bounds(t: int, d: int, value_bytes: int, total: int) -> tuple[int, int]:
    """Smallest and largest frame the header allows (1-bit tokens .. raw tokens)."""
    fixed = HEADER.size + t * (5 + count_width(d)) + total * (index_width(d) + value_bytes) + CRC_BYTES
    return fixed + t * ((d + 7) // 8), fixed + t * d * value_bytes


def read_frame(data: bytes | bytearray | memoryview, allowed_bits: frozenset[int],
               limits: FrameLimits | None = None) -> FrameContents:
    """Parse and validate a frame; ``allowed_bits`` are the quantised widths a decoder accepts,
    ``limits`` what this receiver accepts (checked against the header first)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FrameError(f"a frame must be bytes, got {type(data).__name__}")
    buf = memoryview(data).cast("B")
    if len(buf) < HEADER.size + CRC_BYTES:
        raise FrameError(f"frame truncated: {len(buf)} bytes, the header alone needs {HEADER.size + CRC_BYTES}")
    magic, version, dtype_code, flags, reserved, t, d, total = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise FrameError(f"not a codec frame (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != FRAME_VERSION:
        raise FrameError(f"frame version {version} is not supported (this decoder reads version {FRAME_VERSION})")
    if dtype_code not in CODE_DTYPES:
        raise FrameError(f"unknown dtype code {dtype_code}")
    if flags or reserved:
        raise FrameError(f"unknown frame flags {flags:#x}/{reserved:#x}")
    if not (0 < d <= MAX_D and t <= MAX_T):
        raise FrameError(f"frame dimensions out of range: T={t}, d={d}")
    if total > t * d:
        raise FrameError(f"frame claims {total} outliers for {t}x{d} values")
    dtype = CODE_DTYPES[dtype_code]
    if limits is not None:
        limits.check(t, d, dtype, total)
    value_bytes = torch.empty((), dtype=dtype).element_size()
    smallest, largest = _size_bounds(t, d, value_bytes, total)
    if not smallest <= len(buf) <= largest:
        raise FrameError(f"frame of {len(buf)} bytes cannot hold T={t}, d={d}, {total} outliers "
                         f"({smallest}..{largest} bytes)")
    crc_at = len(buf) - CRC_BYTES
    (crc,) = struct.unpack_from("<I", buf, crc_at)
    if zlib.crc32(buf[:crc_at]) != crc:
        raise FrameError("frame CRC mismatch (corrupted or truncated frame)")

    raw_bits = value_bytes * 8
    cw, iw = count_width(d), index_width(d)
    r = _Reader(buf, crc_at)
    bits = np.frombuffer(r.take(t, "bits"), dtype="<u1")
    step = np.frombuffer(r.take(2 * t, "step"), dtype="<f2")
    lo = np.frombuffer(r.take(2 * t, "lo"), dtype="<f2")
    counts = np.frombuffer(r.take(cw * t, "counts"), dtype="<u2" if cw == 2 else "<u4").astype(np.int64)

    valid = np.isin(bits, np.array(sorted(allowed_bits | {raw_bits}), dtype=np.uint8))
    if not valid.all():
        bad = int(bits[~valid][0])
        raise FrameError(f"token bit width {bad} is not one of {sorted(allowed_bits)} or raw ({raw_bits})")
    if not (np.isfinite(step).all() and np.isfinite(lo).all() and (step >= 0).all()):
        raise FrameError("a token has a non-finite lo or a negative/non-finite step")
    if (counts > d).any() or int(counts.sum()) != total:
        raise FrameError(f"outlier counts do not add up: sum {int(counts.sum())}, header {total}, d {d}")

    indices = np.frombuffer(r.take(iw * total, "outlier indices"), dtype="<u2" if iw == 2 else "<u4")
    values_raw = r.take(value_bytes * total, "outlier values")
    streams_len = int(stream_nbytes(bits, d, raw_bits).sum())
    streams = np.frombuffer(r.take(streams_len, "bit streams"), dtype=np.uint8)
    if r.pos != crc_at:
        raise FrameError(f"frame has {crc_at - r.pos} unexpected bytes after the bit streams")

    indices = indices.astype(np.int32)  # d <= MAX_D = 2^24 fits
    if total:
        if int(indices.max()) >= d:
            raise FrameError(f"outlier index out of range (d = {d})")
        # Within a token indices rise strictly; a drop is allowed only where a new token starts.
        drops = np.flatnonzero(np.diff(indices) <= 0) + 1
        if drops.size:
            starts = np.cumsum(counts)[:-1]
            if not np.isin(drops, starts).all():
                raise FrameError("outlier indices must be strictly increasing within a token")
    values = torch.frombuffer(bytearray(values_raw), dtype=torch.uint8).view(dtype) if total else torch.empty(0, dtype=dtype)
    if not torch.isfinite(values).all():
        raise FrameError("an outlier value is not finite")
    # ``streams`` stays a read-only view of ``data``: the decoder copies from it once, into its output.
    return FrameContents(dtype, d, bits.copy(), step.copy(), lo.copy(), counts, indices, values, streams)
