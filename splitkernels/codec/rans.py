"""Static-table rANS: the entropy stage of codec v2 (docs/FORMATS.md §5.3).

This module is the plain-Python reference coder (ground truth for tests and golden vectors) plus
the table builder. ``encode``/``decode`` use the C++ coder (``splitkernels._C``) when it is built
and fall back to the reference otherwise; both produce identical bytes.

Parameters (fixed by the format): probabilities in units of ``1 / 2**PREC_BITS``, a 32-bit state
kept in ``[2**16, 2**32)``, 16-bit renormalisation words, interleaved states: ``lanes(n)`` in the
narrow layout, ``LONG_LANES`` in the four-lane layout (frames of 2048 values or more, one token
among them) or ``WIDE_LANES`` in the wide layout of long frames (16 lanes per AVX-512 instruction
in the C++ coder).
"""
from __future__ import annotations

import functools
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .._native import load

PREC_BITS = 14
M = 1 << PREC_BITS
RANS_L = 1 << 16
MAX_SYMBOLS = 256
# No symbol may have probability above 1/2, so every symbol costs at least about one bit: a frame
# cannot claim more symbols than ``max_symbols(stream_bytes)`` (bounded decoder allocation).
MAX_FREQ = M // 2
LANES_MIN_SYMBOLS = 1 << 14
LONG_LANES = 4  # lanes(n) from LANES_MIN_SYMBOLS symbols; the four-lane layout (frame coder "rans4")
WIDE_LANES = 32  # the wide layout (frame coder "rans32")
VALID_LANES = (1, LONG_LANES, WIDE_LANES)
MAX_CLASSES = 64  # tables of one ClassTables (their native tables take ~86 KB each)

_C, _ = load("_C")


class RansError(ValueError):
    """An rANS stream is inconsistent with its table or symbol count."""


def lanes(n: int) -> int:
    """Interleaved states of the narrow layout for ``n`` symbols: 1 for short streams, 4 for long ones."""
    return LONG_LANES if n >= LANES_MIN_SYMBOLS else 1


def _stream_lanes(n: int, n_lanes: int | None) -> int:
    """``n_lanes`` (checked), or the narrow layout's ``lanes(n)`` when None."""
    if n_lanes is None:
        return lanes(n)
    if n_lanes not in VALID_LANES:
        raise ValueError(f"an rANS stream has 1, {LONG_LANES} or {WIDE_LANES} lanes, got {n_lanes}")
    return n_lanes


def max_symbols(stream_bytes: int) -> int:
    """Most symbols a valid stream of ``stream_bytes`` bytes can hold.

    Every symbol has probability <= 1/2 and each coding step at least multiplies the state by 1.5
    (floor and renormalisation losses included), so a symbol costs more than 0.58 bit; 16 symbols
    per byte (plus the states) is a safe bound that no valid stream exceeds.
    """
    return 16 * stream_bytes + 64


def check_freqs(freqs: Sequence[int]) -> None:
    """Raise ValueError unless ``freqs`` is a valid table: 2..256 entries, each 1..MAX_FREQ, sum M."""
    f = list(freqs)
    if not 2 <= len(f) <= MAX_SYMBOLS:
        raise ValueError(f"freqs must have 2..{MAX_SYMBOLS} entries, got {len(f)}")
    if any(not isinstance(v, (int, np.integer)) or not 1 <= v <= MAX_FREQ for v in f):
        raise ValueError(f"every freqs entry must be an int in [1, {MAX_FREQ}]")
    if sum(f) != M:
        raise ValueError(f"freqs must sum to {M}, got {sum(f)}")


def build_freqs(counts: Sequence[int] | np.ndarray) -> tuple[int, ...]:
    """Normalise symbol counts to a table summing to ``M``; every symbol >= 1, none above MAX_FREQ.

    Deterministic (ties broken by symbol index) so that a calibration reproduces its table.
    """
    c = np.asarray(counts, dtype=np.float64)
    n = c.shape[0]
    if not 2 <= n <= MAX_SYMBOLS:
        raise ValueError(f"counts must have 2..{MAX_SYMBOLS} entries, got {n}")
    if (c < 0).any() or not np.isfinite(c).all():
        raise ValueError("counts must be finite and non-negative")
    total = c.sum()
    p = c / total if total > 0 else np.full(n, 1.0 / n)
    f = np.maximum(1, np.floor(p * (M - n)).astype(np.int64) + 1)
    f = np.minimum(f, MAX_FREQ)
    # Hand out the rounding remainder one unit at a time, largest expected gain p / f first (ties:
    # the lower symbol), or take back a unit where the loss p / (f - 1) is least when rounding
    # overshot. Units go out in runs (_hand_out): a capped symbol (a peaked table) leaves thousands
    # of them, which one numpy pass each made 50 ms per table.
    short = M - int(f.sum())
    if short > 0:
        f = _hand_out(f, p, short)
    while f.sum() > M:
        loss = np.where(f > 1, p / (f - 1), np.inf)
        f[int(np.argmin(loss))] -= 1
    return tuple(int(v) for v in f)


def _hand_out(f: np.ndarray, p: np.ndarray, units: int) -> np.ndarray:
    """``f`` after ``units`` single increments, each to the symbol of largest ``p / f`` below
    MAX_FREQ (the lowest such symbol on a tie): the same table as one increment per step, with each
    symbol's run of consecutive wins taken at once (a heap holds the others' keys)."""
    f = [int(v) for v in f]
    p = [float(v) for v in p]

    def key(i: int, fi: int) -> tuple[float, int]:  # smallest first: largest gain, then lowest symbol
        return (-(p[i] / fi), i) if fi < MAX_FREQ else (1.0, i)  # a capped symbol's gain is -1

    heap = [key(i, fi) for i, fi in enumerate(f)]
    heapq.heapify(heap)
    while units:
        _, i = heapq.heappop(heap)
        rival = heap[0] if heap else (math.inf, len(f))
        # i keeps winning while its key after t more units stays below the rival's (monotone in t);
        # most runs are one unit long.
        lo, hi = 1, min(units, MAX_FREQ - f[i])
        if hi > 1 and not key(i, f[i] + 1) < rival:
            hi = 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if key(i, f[i] + mid - 1) < rival:
                lo = mid
            else:
                hi = mid - 1
        f[i] += lo
        units -= lo
        heapq.heappush(heap, key(i, f[i]))
    return np.asarray(f, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class ClassTables:
    """One static table per channel class: position ``i`` of a token-major ``[T, d]`` symbol stream
    is coded with ``tables[table_of[i % d]]`` (``d = len(table_of)``).

    Channels whose symbols spread alike share a class, so a channel that is nearly always 0 does not
    pay for the tails of one that is not. Every table covers the same alphabet.
    """

    tables: tuple[tuple[int, ...], ...]
    table_of: tuple[int, ...]

    def __post_init__(self) -> None:
        tables = tuple(tuple(int(v) for v in t) for t in self.tables)
        table_of = np.asarray(self.table_of, dtype=np.int64).ravel()
        object.__setattr__(self, "tables", tables)
        object.__setattr__(self, "table_of", tuple(int(v) for v in table_of))
        if not 1 <= len(tables) <= MAX_CLASSES:
            raise ValueError(f"class tables must number 1..{MAX_CLASSES}, got {len(tables)}")
        for t in tables:
            check_freqs(t)
            if len(t) != len(tables[0]):
                raise ValueError(f"every class table must have {len(tables[0])} entries, got {len(t)}")
        if table_of.size < 1 or table_of.min() < 0 or table_of.max() >= len(tables):
            raise ValueError(f"table_of must hold at least one table index in [0, {len(tables)})")

    @property
    def nsym(self) -> int:
        return len(self.tables[0])

    @functools.cached_property
    def _slot_tables(self) -> list[tuple[np.ndarray, list[int]]]:
        return [(np.repeat(np.arange(len(f), dtype=np.uint8), f), _cum(f)) for f in self.tables]

    @functools.cached_property
    def native_classes(self) -> np.ndarray:
        """One pointer per class to the C++ coder's tables (built once per object), in one block,
        so the wide coder reaches them by 32-bit offsets."""
        words = _C.rans_tables_bytes() // 8 + 1  # 8-byte aligned tables
        block = np.empty(words * len(self.tables), dtype=np.uint64)
        for k, t in enumerate(self.tables):
            table = np.ascontiguousarray(np.asarray(t, dtype=np.uint32))
            _C.rans_build_tables(table.ctypes.data, table.shape[0], block[k * words :].ctypes.data)
        block.setflags(write=False)
        ptrs = np.asarray([block[k * words :].ctypes.data for k in range(len(self.tables))], dtype=np.uint64)
        ptrs.setflags(write=False)
        object.__setattr__(self, "_block", block)  # keeps the tables alive as long as the pointers
        return ptrs

    @functools.cached_property
    def native(self) -> np.ndarray:
        """One pointer per channel to the C++ coder's tables of its class (:attr:`native_classes`)."""
        ptrs = self.native_classes[np.asarray(self.table_of, dtype=np.int64)]
        ptrs.setflags(write=False)
        return ptrs


def as_class_tables(freqs: Sequence[int] | ClassTables) -> ClassTables:
    """``freqs`` itself, or one frequency table as a single class."""
    return freqs if isinstance(freqs, ClassTables) else _single(tuple(int(v) for v in freqs))


def per_channel(table_params, tables: Sequence[Sequence[int]], table_of: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Two per-channel u8 arrays from a coder's ``table_params(freqs) -> (x, y)`` of each channel's
    class table ``tables[table_of[c]]`` (``table_of = [0]``: one entry for every channel)."""
    params = [table_params(tuple(int(v) for v in t)) for t in tables]
    return (np.array([params[i][0] for i in table_of], dtype=np.uint8),
            np.array([params[i][1] for i in table_of], dtype=np.uint8))


def mean_code_bits(tables: Sequence[Sequence[int]], code_bits_of) -> float:
    """Bits per symbol a coder spends on symbols drawn from the tables, equally weighted, where
    ``code_bits_of(freqs)`` gives the bits of each symbol of a table under that coder."""
    out = []
    for t in tables:
        f = np.asarray(t, dtype=np.float64)
        out.append(float((f * code_bits_of(tuple(int(v) for v in t))).sum() / f.sum()))
    return float(np.mean(out))


@functools.lru_cache(maxsize=64)
def _single(freqs: tuple[int, ...]) -> ClassTables:
    return ClassTables((freqs,), (0,))


def _cum(freqs: Sequence[int]) -> list[int]:
    out, acc = [], 0
    for v in freqs:
        out.append(acc)
        acc += v
    return out


def encode_reference(symbols: np.ndarray, freqs: Sequence[int] | ClassTables, n_lanes: int | None = None) -> bytes:
    """Reference encoder: ``n_lanes`` (1, 4 or 32; None: ``lanes(n)``) u32 states then u16 words,
    all little-endian, in decode order. ``freqs``: one table, or :class:`ClassTables` (symbol ``i``
    with its channel's table)."""
    ct = as_class_tables(freqs)
    sym = np.asarray(symbols, dtype=np.uint8).ravel()
    n, nl = sym.shape[0], _stream_lanes(sym.shape[0], n_lanes)
    if n == 0:
        return b""
    if int(sym.max()) >= ct.nsym:
        raise ValueError(f"symbol {int(sym.max())} is outside the table of {ct.nsym} symbols")
    cums = [_cum(t) for t in ct.tables]
    period = len(ct.table_of)
    state = [RANS_L] * nl
    words: list[int] = []  # emitted in reverse decode order
    for i in range(n - 1, -1, -1):
        j = i % nl
        s = int(sym[i])
        c = ct.table_of[i % period]
        f, cum = ct.tables[c][s], cums[c]
        x = state[j]
        if x >= f << (32 - PREC_BITS):  # ((RANS_L >> PREC_BITS) << 16) * f
            words.append(x & 0xFFFF)
            x >>= 16
        state[j] = (x // f << PREC_BITS) + x % f + cum[s]
    head = np.array(state, dtype="<u4").tobytes()
    return head + np.array(words[::-1], dtype="<u2").tobytes()


def decode_reference(data: bytes | memoryview, freqs: Sequence[int] | ClassTables, n: int,
                     n_lanes: int | None = None) -> np.ndarray:
    """Reference decoder of a stream on ``n_lanes`` states (as :func:`encode_reference`); raises
    :class:`RansError` unless the stream holds exactly ``n`` symbols."""
    ct = as_class_tables(freqs)
    nl = _stream_lanes(n, n_lanes)
    buf = bytes(data)
    if n == 0:
        if buf:
            raise RansError(f"an empty symbol stream must have 0 bytes, got {len(buf)}")
        return np.zeros(0, dtype=np.uint8)
    if len(buf) < 4 * nl or (len(buf) - 4 * nl) % 2:
        raise RansError(f"rANS stream of {len(buf)} bytes is not {nl} states plus 16-bit words")
    if n > max_symbols(len(buf)):
        raise RansError(f"{n} symbols cannot fit in a {len(buf)}-byte rANS stream")
    state = [int(v) for v in np.frombuffer(buf[: 4 * nl], dtype="<u4")]
    words = np.frombuffer(buf[4 * nl :], dtype="<u2")
    if any(x < RANS_L for x in state):
        raise RansError("rANS initial state below the renormalisation bound")
    period = len(ct.table_of)
    out = np.empty(n, dtype=np.uint8)
    pos = 0
    for i in range(n):
        j = i % nl
        x = state[j]
        c = ct.table_of[i % period]
        slot_sym, cum = ct._slot_tables[c]
        slot = x & (M - 1)
        s = int(slot_sym[slot])
        x = ct.tables[c][s] * (x >> PREC_BITS) + slot - cum[s]
        if x < RANS_L:
            if pos >= words.shape[0]:
                raise RansError("rANS stream ends early")
            x = (x << 16) | int(words[pos])
            pos += 1
        state[j] = x
        out[i] = s
    if pos != words.shape[0] or any(x != RANS_L for x in state):
        raise RansError("rANS stream does not end in the initial state (corrupted or wrong table)")
    return out


def has_native() -> bool:
    """True when the C++ coder (``splitkernels._C``) is built."""
    return _C is not None and hasattr(_C, "rans_build_tables")


def encode(symbols: np.ndarray, freqs: Sequence[int] | ClassTables, n_lanes: int | None = None) -> bytes:
    """Encode u8 ``symbols`` with one static table or :class:`ClassTables` on ``n_lanes`` states
    (1, 4 or 32; None: ``lanes(n)``) (C++ coder when built, else the reference)."""
    ct = as_class_tables(freqs)
    sym = np.ascontiguousarray(np.asarray(symbols, dtype=np.uint8).ravel())
    nl = _stream_lanes(sym.shape[0], n_lanes)
    if not has_native():
        return encode_reference(sym, ct, nl)
    if sym.shape[0] and int(sym.max()) >= ct.nsym:
        raise ValueError(f"symbol {int(sym.max())} is outside the table of {ct.nsym} symbols")
    ptrs = ct.native
    out = np.empty(4 * nl + 2 * sym.shape[0], dtype=np.uint8)
    n_out = _C.rans_encode(sym.ctypes.data, sym.shape[0], ptrs.ctypes.data, ptrs.shape[0], nl, out.ctypes.data,
                           out.shape[0])
    return out[:n_out].tobytes()


def decode(data: bytes | memoryview, freqs: Sequence[int] | ClassTables, n: int,
           count_of: int = -1, n_lanes: int | None = None) -> np.ndarray | tuple[np.ndarray, int]:
    """Decode ``n`` symbols on ``n_lanes`` states (as :func:`encode`) with one table or
    :class:`ClassTables` (C++ coder when built, else the reference); :class:`RansError` if invalid.

    With ``count_of`` >= 0, also return how many decoded symbols equal it (counted by the coder).
    """
    ct = as_class_tables(freqs)
    nl = _stream_lanes(n, n_lanes)
    if not has_native():
        out = decode_reference(data, ct, n, nl)
        return out if count_of < 0 else (out, int((out == count_of).sum()))
    buf = np.frombuffer(data, dtype=np.uint8)
    if n > max_symbols(buf.shape[0]):
        raise RansError(f"{n} symbols cannot fit in a {buf.shape[0]}-byte rANS stream")
    ptrs = ct.native
    out = np.empty(n, dtype=np.uint8)
    err, count = _C.rans_decode(buf.ctypes.data, buf.shape[0], n, ptrs.ctypes.data, ptrs.shape[0], nl,
                                out.ctypes.data, count_of)
    if err:
        raise RansError(err)
    return out if count_of < 0 else (out, count)
