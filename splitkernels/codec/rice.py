"""Rice coder: the fast symbol coder of codec v2 for long frames (docs/FORMATS.md §5.7).

The activation codes are close to two-sided geometric around their table's mode, and for such
sources a Rice code (a unary quotient and a ``k``-bit remainder of the symbol's zigzag distance from
the mode) is within a few hundredths of a bit of the entropy. Each channel takes the centre and
``k`` of its class table (``table_params``): on the calibrated SmolLM2 and Gemma 3 tables that is
about 0.1 bit per symbol above static rANS with class tables and 0.4 below the nibble coder.

A Rice code is a prefix code with power-of-two probabilities, so it runs on the wide rANS layout
(§5.3) with every table lookup replaced by shifts: 32 interleaved u32 states kept in ``[2^16,
2^32)``, each a stack of bits. The encoder takes the symbols from the last to the first; symbol
``i`` on lane ``j = i % 32`` with code ``code`` of ``len`` bits: if ``x_j >= 2^(32 - len)``, emit
the 16-bit word ``x_j & 0xFFFF`` and ``x_j >>= 16``; then ``x_j = (x_j << len) | code``. The
decoder pops the codes in symbol order from the low end and refills a state below ``2^16`` with
the next word. The code of symbol ``s`` (``u`` its zigzag distance from the centre ``c``, ``q = u
>> k``, ``top = 16 - k``): ``q`` one bits, a zero and the ``k`` low bits of ``u`` when ``q < top``,
least significant bit first; else ``top`` one bits and ``s`` goes to the exception bytes.

Stream layout (little-endian): ``n_x u32 | 32 states u32 | words u16 | n_x exception bytes``.

This module is the plain-Python reference (ground truth for tests and golden vectors). ``encode``
and ``decode`` use the C++ coder (``splitkernels._C``) when it is built; both give identical bytes.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from .._native import load
from . import rans

LANES = 32
MAX_K = 7
STATE_LOW = 1 << 16
HEAD_BYTES = 4 + 4 * LANES

_C, _ = load("_C")


class RiceError(ValueError):
    """A Rice stream is inconsistent with its parameters or symbol count."""


def zigzag(v):
    """Distance ``v`` from the centre -> ``u``: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ... (the Rice codes' ``u``)."""
    return np.where(v >= 0, 2 * v, -2 * v - 1)


def code_bits(freqs: Sequence[int], centre: int, k: int) -> np.ndarray:
    """Bits each symbol of a table of ``len(freqs)`` symbols costs (an exception: its ``16 - k``
    code bits and its byte)."""
    q = zigzag(np.arange(len(freqs), dtype=np.int64) - centre) >> k
    return np.where(q < 16 - k, q + 1 + k, 16 - k + 8)


@functools.lru_cache(maxsize=256)
def table_params(freqs: tuple[int, ...]) -> tuple[int, int]:
    """``(centre, k)`` of a frequency table: the most frequent symbol (the smallest on ties) and
    the ``k`` in ``0..MAX_K`` with the fewest expected bits (the smallest on ties, exact in integers)."""
    f = np.asarray(freqs, dtype=np.int64)
    centre = int(np.argmax(f))
    costs = [int((f * code_bits(freqs, centre, k)).sum()) for k in range(MAX_K + 1)]
    return centre, int(np.argmin(costs))


def channel_params(tables: Sequence[Sequence[int]], table_of: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(centres, ks)`` (u8): channel ``c`` takes ``tables[table_of[c]]`` (one entry
    per channel, or ``table_of = [0]``: one table for every channel)."""
    return rans.per_channel(table_params, tables, table_of)


def expected_bits(tables: Sequence[Sequence[int]]) -> float:
    """Bits per symbol this coder spends on symbols drawn from the tables, equally weighted (head aside)."""
    return rans.mean_code_bits(tables, lambda t: code_bits(t, *table_params(t)))


def extra_bits(tables: Sequence[Sequence[int]]) -> float:
    """``expected_bits`` minus the tables' mean entropy: what the coder costs over static rANS."""
    entropy = []
    for t in tables:
        p = np.asarray(t, dtype=np.float64)
        p = p[p > 0] / p.sum()
        entropy.append(float(-(p * np.log2(p)).sum()))
    return expected_bits(tables) - float(np.mean(entropy))


def max_symbols(stream_bytes: int) -> int:
    """Most symbols a stream of ``stream_bytes`` bytes can hold (every code has at least one bit and
    a state holds at most 15 bits above its bound): the bound checked before allocating."""
    return 8 * max(stream_bytes, 0) + 15 * LANES


def _code(s: int, c: int, k: int) -> tuple[int, int, bool]:
    """``(code, length, is_exception)`` of symbol ``s`` (centre ``c``, parameter ``k``)."""
    u = 2 * (s - c) if s >= c else 2 * (c - s) - 1
    q, top = u >> k, 16 - k
    if q < top:
        return ((1 << q) - 1) | ((u & ((1 << k) - 1)) << (q + 1)), q + 1 + k, False
    return (1 << top) - 1, top, True


def encode_reference(symbols: np.ndarray, centres: np.ndarray, ks: np.ndarray, nsym: int) -> bytes:
    """Reference encoder of u8 ``symbols`` (1-D; symbol ``i`` uses ``centres[i % period]``, ``ks[i % period]``)."""
    sym = np.asarray(symbols, dtype=np.uint8).reshape(-1)
    if sym.size == 0:
        return b""
    if int(sym.max()) >= nsym:
        raise ValueError(f"symbol {int(sym.max())} is outside the table of {nsym} symbols")
    period = len(centres)
    x = [STATE_LOW] * LANES
    words: list[int] = []
    excs: list[int] = []
    for i in range(sym.size - 1, -1, -1):
        s, j = int(sym[i]), i % LANES
        code, length, is_exc = _code(s, int(centres[i % period]), int(ks[i % period]))
        if is_exc:
            excs.append(s)
        if x[j] >> (32 - length):
            words.append(x[j] & 0xFFFF)
            x[j] >>= 16
        x[j] = (x[j] << length) | code
    return (np.array([len(excs)] + x, dtype="<u4").tobytes() + np.array(words[::-1], dtype="<u2").tobytes()
            + bytes(excs[::-1]))


def decode_reference(data: bytes | memoryview, n: int, centres: np.ndarray, ks: np.ndarray, nsym: int) -> np.ndarray:
    """Reference decoder: u8 ``[n]``; RiceError unless ``data`` is exactly a valid stream of ``n`` symbols."""
    buf = bytes(data)
    if n == 0:
        if buf:
            raise RiceError("an empty symbol stream must have 0 bytes")
        return np.zeros(0, dtype=np.uint8)
    if n > max_symbols(len(buf)):
        raise RiceError(f"{n} symbols cannot fit in a {len(buf)}-byte Rice stream")
    if len(buf) < HEAD_BYTES:
        raise RiceError("Rice stream is shorter than its exception count and states")
    head = np.frombuffer(buf[:HEAD_BYTES], dtype="<u4")
    n_x, x = int(head[0]), [int(v) for v in head[1:]]
    if n_x > n or n_x > len(buf) - HEAD_BYTES or (len(buf) - HEAD_BYTES - n_x) % 2:
        raise RiceError("Rice stream is not its states, 16-bit words and exception bytes")
    if min(x) < STATE_LOW:
        raise RiceError("Rice initial state below the renormalisation bound")
    words = np.frombuffer(buf[HEAD_BYTES : len(buf) - n_x], dtype="<u2").tolist()
    excs = buf[len(buf) - n_x :]
    period, w, e = len(centres), 0, 0
    out = np.empty(n, dtype=np.uint8)
    for i in range(n):
        j, c, k = i % LANES, int(centres[i % period]), int(ks[i % period])
        top = 16 - k
        q = 0
        while q < top and (x[j] >> q) & 1:
            q += 1
        if q == top:
            if e == len(excs):
                raise RiceError("Rice stream has fewer exception bytes than exceptions")
            s = excs[e]
            e += 1
            if s >= nsym or _code(s, c, k)[2] is False:
                raise RiceError("a Rice exception names a symbol outside the table or is not coded canonically")
            x[j] >>= top
        else:
            u = (q << k) | ((x[j] >> (q + 1)) & ((1 << k) - 1))
            s = c + (u >> 1 if u % 2 == 0 else -((u + 1) >> 1))
            if not 0 <= s < nsym:
                raise RiceError("a Rice code names a symbol outside the table")
            x[j] >>= q + 1 + k
        out[i] = s
        if x[j] < STATE_LOW:
            if w == len(words):
                raise RiceError("Rice stream ends early")
            x[j] = (x[j] << 16) | words[w]
            w += 1
    if w != len(words) or e != len(excs):
        raise RiceError("Rice stream has unread words or exception bytes")
    if any(v != STATE_LOW for v in x):
        raise RiceError("Rice stream does not end in the initial state (corrupted or wrong config)")
    return out


def has_native() -> bool:
    """True when the C++ coder (``splitkernels._C``) is built."""
    return _C is not None and hasattr(_C, "rice_encode")


def vectorised() -> bool:
    """True when the C++ coder runs a vector path here (AVX2 or AVX-512). The scalar coder is slower
    than scalar rANS (one branchy step per symbol against rANS's table steps in sub-groups), so only
    a vector path makes Rice the fast choice."""
    return has_native() and _C.rice_isa() != "scalar"


def encode(symbols: np.ndarray, centres: np.ndarray, ks: np.ndarray, nsym: int) -> bytes:
    """Stream of u8 ``symbols`` (flattened; C++ when built)."""
    sym = np.ascontiguousarray(np.asarray(symbols, dtype=np.uint8).reshape(-1))
    if not has_native():
        return encode_reference(sym, centres, ks, nsym)
    if sym.size == 0:
        return b""
    c, k = np.ascontiguousarray(centres, dtype=np.uint8), np.ascontiguousarray(ks, dtype=np.uint8)
    out = np.empty(_C.rice_capacity(sym.size), dtype=np.uint8)
    try:
        n = _C.rice_encode(sym.ctypes.data, sym.size, c.ctypes.data, k.ctypes.data, c.size, nsym, out.ctypes.data,
                           out.size)
    except ValueError:
        raise ValueError(f"a symbol is outside the table of {nsym} symbols or a parameter is out of range") from None
    return out[:n].tobytes()


def decode(data: bytes | memoryview, n: int, centres: np.ndarray, ks: np.ndarray, nsym: int,
           count_of: int = -1) -> tuple[np.ndarray, int]:
    """``n`` symbols (u8) and how many equal ``count_of``; RiceError unless ``data`` is exactly a
    valid stream. The size check against ``max_symbols`` comes before anything is allocated."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if n > max_symbols(buf.size):
        raise RiceError(f"{n} symbols cannot fit in a {buf.size}-byte Rice stream")
    if not has_native():
        out = decode_reference(buf, n, centres, ks, nsym)
        return out, int((out == count_of).sum())
    c, k = np.ascontiguousarray(centres, dtype=np.uint8), np.ascontiguousarray(ks, dtype=np.uint8)
    out = np.empty(n, dtype=np.uint8)
    err, count = _C.rice_decode(buf.ctypes.data, buf.size, n, c.ctypes.data, k.ctypes.data, c.size, nsym,
                                out.ctypes.data, count_of)
    if err:
        raise RiceError(err)
    return out, count
