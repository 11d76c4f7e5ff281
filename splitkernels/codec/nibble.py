"""Nibble coder: the fast symbol coder of codec v2 for long frames (docs/FORMATS.md §5.6).

rANS (``rans``) gets within a few hundredths of a bit of the symbols' entropy but codes one symbol
at a time; this coder spends about 0.2 bit per element more and runs at memory speed, so long
prefill frames use it and one-token frames keep rANS.

The 15 symbols of the most probable contiguous window ``[a, a + 15)`` of the config's static table
(``window_start``) code as one 4-bit nibble ``s - a``. Any other symbol is an *exception*: nibble
15, then a second-level nibble with its distance ``e`` from the window (``2 * (s - a - 15)`` above
it, ``2 * (a - 1 - s) + 1`` below it) when ``e < 15``, else nibble 15 and the symbol as a byte.

Stream layout (little-endian), for ``rows`` coded tokens of ``d`` symbols:

    n_x u32 | n_xx u32 | level 1: rows * ceil(d / 2) bytes | level 2: ceil(n_x / 2) bytes | level 3: n_xx bytes

Nibbles pack two per byte, the earlier one in the low half; every row starts on a byte, and padding
nibbles are 0. ``n_x`` counts exceptions (level-1 nibbles 15), ``n_xx`` level-2 nibbles 15.

This module is the plain-NumPy reference (ground truth for tests and golden vectors). ``encode`` and
``decode`` use the C++ coder (``splitkernels._C``) when it is built; both give identical bytes.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from .._native import load

WINDOW = 15
ESCAPE_NIBBLE = 15
HEAD_BYTES = 8

_C, _ = load("_C")


class NibbleError(ValueError):
    """A nibble stream is inconsistent with its table, shape or counts."""


@functools.lru_cache(maxsize=64)
def window_start(freqs: tuple[int, ...]) -> int:
    """``a``: start of the 15 contiguous symbols with the largest total frequency (smallest ``a`` on ties)."""
    n = len(freqs)
    if n <= WINDOW:
        return 0
    f = np.asarray(freqs, dtype=np.int64)
    sums = np.convolve(f, np.ones(WINDOW, dtype=np.int64), mode="valid")
    return int(np.argmax(sums))


def level1_bytes(rows: int, d: int) -> int:
    """Bytes of the level-1 section: every row of ``d`` nibbles starts on a byte."""
    return rows * ((d + 1) // 2)


def max_rows(stream_bytes: int, d: int) -> int:
    """Most coded rows of ``d`` symbols a stream of ``stream_bytes`` bytes can hold (bounded allocation)."""
    return max(stream_bytes - HEAD_BYTES, 0) // ((d + 1) // 2)


def pack_nibbles(nibbles: np.ndarray) -> np.ndarray:
    """Rows of nibbles (u8 < 16) -> bytes, two per byte, low half first, a padding nibble 0 per odd row."""
    rows, n = nibbles.shape
    if n % 2:
        nibbles = np.concatenate([nibbles, np.zeros((rows, 1), dtype=np.uint8)], axis=1)
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(data: np.ndarray, rows: int, n: int, what: str) -> np.ndarray:
    """Bytes -> ``[rows, n]`` nibbles; NibbleError when a padding nibble is not 0."""
    b = data.reshape(rows, (n + 1) // 2)
    out = np.empty((rows, 2 * b.shape[1]), dtype=np.uint8)
    out[:, 0::2] = b & 15
    out[:, 1::2] = b >> 4
    if n % 2 and out[:, n].any():
        raise NibbleError(f"{what}: a padding nibble is not 0")
    return out[:, :n]


def encode_reference(symbols: np.ndarray, freqs: Sequence[int]) -> bytes:
    """Reference encoder of u8 ``symbols [rows, d]`` (every symbol < len(freqs))."""
    sym = np.asarray(symbols, dtype=np.uint8)
    if sym.ndim != 2:
        raise ValueError(f"symbols must be [rows, d], got shape {tuple(sym.shape)}")
    if sym.size and int(sym.max()) >= len(freqs):
        raise ValueError(f"symbol {int(sym.max())} is outside the table of {len(freqs)} symbols")
    a = window_start(tuple(freqs))
    s = sym.astype(np.int64)
    inside = (s >= a) & (s < a + WINDOW)
    level1 = np.where(inside, s - a, ESCAPE_NIBBLE).astype(np.uint8)
    x = s[~inside]  # row-major: token order, then channel order
    e = np.where(x >= a + WINDOW, 2 * (x - a - WINDOW), 2 * (a - 1 - x) + 1)
    level2 = np.minimum(e, ESCAPE_NIBBLE).astype(np.uint8)
    level3 = x[e >= ESCAPE_NIBBLE].astype(np.uint8)
    head = np.array([x.size, level3.size], dtype="<u4").tobytes()
    return head + pack_nibbles(level1).tobytes() + pack_nibbles(level2[None, :]).tobytes() + level3.tobytes()


def decode_reference(data: bytes | memoryview, freqs: Sequence[int], rows: int, d: int) -> np.ndarray:
    """Reference decoder: u8 ``[rows, d]``; NibbleError unless ``data`` is exactly a valid stream."""
    buf = np.frombuffer(bytes(data), dtype=np.uint8)
    n = len(freqs)
    a = window_start(tuple(freqs))
    if buf.size < HEAD_BYTES:
        raise NibbleError(f"nibble stream of {buf.size} bytes is shorter than its {HEAD_BYTES}-byte head")
    if rows > max_rows(buf.size, d):
        raise NibbleError(f"{rows} rows of {d} symbols cannot fit in a {buf.size}-byte nibble stream")
    n_x, n_xx = (int(v) for v in buf[:HEAD_BYTES].view("<u4"))
    l1 = level1_bytes(rows, d)
    if n_x > rows * d or n_xx > n_x or buf.size != HEAD_BYTES + l1 + (n_x + 1) // 2 + n_xx:
        raise NibbleError(f"nibble stream of {buf.size} bytes does not match {rows} rows of {d}, "
                          f"{n_x} exceptions and {n_xx} long ones")
    level1 = unpack_nibbles(buf[HEAD_BYTES : HEAD_BYTES + l1], rows, d, "level 1")
    at = HEAD_BYTES + l1
    level2 = unpack_nibbles(buf[at : at + (n_x + 1) // 2], 1, n_x, "level 2")[0].astype(np.int64)
    level3 = buf[at + (n_x + 1) // 2 :].astype(np.int64)
    is_x = level1 == ESCAPE_NIBBLE
    if int(is_x.sum()) != n_x:
        raise NibbleError(f"level 1 holds {int(is_x.sum())} exceptions, the head says {n_x}")
    long_ = level2 == ESCAPE_NIBBLE
    if int(long_.sum()) != n_xx:
        raise NibbleError(f"level 2 holds {int(long_.sum())} long exceptions, the head says {n_xx}")
    e = level2.copy()
    x = np.where(e % 2 == 0, a + WINDOW + e // 2, a - 1 - (e - 1) // 2)
    x[long_] = level3
    # Canonical: a short exception names a symbol of the table, a long one a symbol at distance >= 15.
    e_long = np.where(level3 >= a + WINDOW, 2 * (level3 - a - WINDOW), 2 * (a - 1 - level3) + 1)
    if ((x < 0) | (x >= n)).any() or (e_long < ESCAPE_NIBBLE).any():
        raise NibbleError("an exception names a symbol outside the table or is not coded canonically")
    out = level1.astype(np.int64) + a
    if (out[~is_x] >= n).any():
        raise NibbleError("a level-1 nibble names a symbol outside the table")
    out[is_x] = x
    return out.astype(np.uint8)


def has_native() -> bool:
    """True when the C++ coder (``splitkernels._C``) is built."""
    return _C is not None and hasattr(_C, "nibble_encode")


@functools.lru_cache(maxsize=64)
def expected_bits(freqs: tuple[int, ...]) -> float:
    """Bits per symbol this coder spends on symbols drawn from ``freqs`` (head and padding aside)."""
    p = np.asarray(freqs, dtype=np.float64) / float(sum(freqs))
    a = window_start(freqs)
    s = np.arange(len(freqs))
    outside = (s < a) | (s >= a + WINDOW)
    e = np.where(s >= a + WINDOW, 2 * (s - a - WINDOW), 2 * (a - 1 - s) + 1)
    return float(4.0 + 4.0 * p[outside].sum() + 8.0 * p[outside & (e >= ESCAPE_NIBBLE)].sum())


def encode(symbols: np.ndarray, raw: np.ndarray | None, freqs: Sequence[int]) -> bytes:
    """Stream of the rows of u8 ``symbols [T, d]`` whose ``raw`` flag is not set (C++ when built)."""
    sym = np.ascontiguousarray(np.asarray(symbols, dtype=np.uint8))
    if sym.ndim != 2:
        raise ValueError(f"symbols must be [T, d], got shape {tuple(sym.shape)}")
    if not has_native():
        return encode_reference(sym if raw is None else sym[~raw], freqs)
    t, d = sym.shape
    if d == 0:
        raise ValueError("symbols must have d >= 1 channels")
    flags = None if raw is None else np.ascontiguousarray(raw, dtype=np.uint8)
    rows = t if flags is None else t - int(flags.sum())
    out = np.empty(_C.nibble_capacity(rows, d), dtype=np.uint8)
    try:
        n = _C.nibble_encode(sym.ctypes.data, t, d, 0 if flags is None else flags.ctypes.data, len(freqs),
                             window_start(tuple(freqs)), out.ctypes.data, out.shape[0])
    except ValueError:
        raise ValueError(f"a symbol is outside the table of {len(freqs)} symbols") from None
    return out[:n].tobytes()


def decode(data: bytes | memoryview, freqs: Sequence[int], raw: np.ndarray, d: int,
           count_of: int = -1) -> tuple[np.ndarray, int]:
    """Symbols u8 ``[T, d]`` (rows flagged in ``raw [T]`` all 0) and how many equal ``count_of``.

    :class:`NibbleError` unless ``data`` is exactly a valid stream of the unflagged rows. The size
    check against ``max_rows`` comes before anything is allocated."""
    t = raw.shape[0]
    rows = t - int(raw.sum())
    buf = np.frombuffer(data, dtype=np.uint8)
    if rows > max_rows(buf.shape[0], d):
        raise NibbleError(f"{rows} rows of {d} symbols cannot fit in a {buf.shape[0]}-byte nibble stream")
    if not has_native():
        out = np.zeros((t, d), dtype=np.uint8)
        out[~raw] = decode_reference(buf, freqs, rows, d)
        return out, int((out[~raw] == count_of).sum())
    flags = np.ascontiguousarray(raw, dtype=np.uint8)
    out = np.empty((t, d), dtype=np.uint8)
    err, count = _C.nibble_decode(buf.ctypes.data, buf.shape[0], t, d, flags.ctypes.data, len(freqs),
                                  window_start(tuple(freqs)), out.ctypes.data, count_of)
    if err:
        raise NibbleError(err)
    return out, count
