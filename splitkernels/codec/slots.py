"""Slot coder: per-channel fixed-width slots, the fast coder of codec v2's long frames (docs/FORMATS.md §5.9).

The nibble coder (``nibble``) gives every symbol a 4-bit slot around one window for all channels,
but calibrated channels differ in spread: on real codes it spends ~0.4 bit per symbol more than the
Rice codes. This coder gives each channel its own window ``[a, a + W)`` and width ``w`` (``W = 2^w -
1``, ``w`` in 1..8), fitted to the channel's calibrated table (``table_params``), so a narrow
channel spends 3 bits and a wide one 5 or 6. A symbol outside its window writes ``W`` (all ones),
then a 4-bit distance ``e`` from the window (``2 * (s - a - W)`` above it, ``2 * (a - 1 - s) + 1``
below it) when ``e < 15``, else nibble 15 and the symbol as a byte.

Every row has the same number of slot bits ``B = sum(w)``, so the layout is static. Coded rows go in
groups of 8 (the last group holds the ``rows % 8`` left, if any); a group of ``g`` rows sends, for
each channel in order and each of its levels ``l < w``, ``g`` bits: bit ``l`` of the channel's slot
in each of the group's rows (the first row lowest). A full group's chunks are bytes, so a block of
64 channels of 8 rows is a byte transpose, one bit-matrix transpose per channel (``gf2p8affineqb``)
and one compress of the channels' level bytes, with no bit-level packing at all.

Stream layout (little-endian), for ``rows`` coded tokens of ``d`` symbols:

    n_x u32 | n_xx u32 | slots: rows * B bits, zero-padded to a byte |
    distances: ceil(n_x / 2) bytes (two nibbles per byte, the earlier one low, a padding nibble 0) |
    n_xx symbol bytes

``n_x`` counts slots equal to ``W`` (escapes), ``n_xx`` distance nibbles 15.

This module is the plain-NumPy reference (ground truth for tests and golden vectors). ``encode``
and ``decode`` use the C++ coder (``splitkernels._C``) when it is built; both give identical bytes.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from .._native import load
from . import rans
from .nibble import NibbleError, pack_nibbles, unpack_nibbles

GROUP = 8  # rows per group
MAX_WIDTH = 8
FAR = 15  # distance nibble of a symbol sent as a byte
HEAD_BYTES = 8

_C, _ = load("_C")


class SlotsError(ValueError):
    """A slot stream is inconsistent with its parameters, shape or counts."""


def distance(s, a, w):
    """Distance ``e`` of the out-of-window symbols ``s`` from the window ``[a, a + 2^w - 1)``."""
    s, a = np.asarray(s, dtype=np.int64), np.asarray(a, dtype=np.int64)
    top = a + (np.left_shift(1, np.asarray(w, dtype=np.int64)) - 1)
    return np.where(s >= top, 2 * (s - top), 2 * (a - 1 - s) + 1)


def code_bits(nsym: int, a: int, w: int) -> np.ndarray:
    """Bits each symbol of a table of ``nsym`` symbols costs in window ``a``, width ``w`` (byte and
    distance nibble of a far symbol included)."""
    s = np.arange(nsym, dtype=np.int64)
    inside = (s >= a) & (s < a + (1 << w) - 1)
    return np.where(inside, w, np.where(distance(s, a, w) < FAR, w + 4, w + 12))


def window_start(f: np.ndarray, size: int) -> int:
    """Start of the ``size`` contiguous symbols of ``f`` with the largest total (smallest on ties; 0
    when the window holds the whole table)."""
    if f.shape[0] <= size:
        return 0
    return int(np.argmax(np.convolve(f, np.ones(size, dtype=np.int64), mode="valid")))


@functools.lru_cache(maxsize=256)
def table_params(freqs: tuple[int, ...]) -> tuple[int, int]:
    """``(a, w)`` of a frequency table: for each width ``w`` in 1..8 the window of ``2^w - 1``
    symbols with the largest total (``window_start``), and the ``w`` whose code costs the fewest
    expected bits (the smallest on ties, exact in integers)."""
    f = np.asarray(freqs, dtype=np.int64)
    best = None
    for w in range(1, MAX_WIDTH + 1):
        a = window_start(f, (1 << w) - 1)
        cost = int((f * code_bits(f.shape[0], a, w)).sum())
        if best is None or cost < best[0]:
            best = (cost, a, w)
    return best[1], best[2]


def channel_params(tables: Sequence[Sequence[int]], table_of: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(a, w)`` (u8): channel ``c`` takes ``tables[table_of[c]]`` (one entry per
    channel, or ``table_of = [0]``: one table for every channel)."""
    return rans.per_channel(table_params, tables, table_of)


def expected_bits(tables: Sequence[Sequence[int]]) -> float:
    """Bits per symbol this coder spends on symbols drawn from the tables, equally weighted (head aside)."""
    return rans.mean_code_bits(tables, lambda t: code_bits(len(t), *table_params(t)))


def _per_channel(starts: np.ndarray, widths: np.ndarray, d: int, nsym: int) -> tuple[np.ndarray, np.ndarray]:
    """``starts`` and ``widths`` as ``int64 [d]`` (one entry: the same for every channel); ValueError
    unless every window lies in a byte and starts inside the table."""
    a, w = np.asarray(starts, dtype=np.int64).reshape(-1), np.asarray(widths, dtype=np.int64).reshape(-1)
    if a.size != w.size or a.size not in (1, d):
        raise ValueError(f"starts and widths must have 1 or d = {d} entries, got {a.size} and {w.size}")
    if ((w < 1) | (w > MAX_WIDTH) | (a < 0) | (a >= nsym) | (a + (1 << w) - 1 > 256)).any():
        raise ValueError(f"a parameter is out of range: widths 1..{MAX_WIDTH}, windows inside 0..255 starting in the table")
    return np.broadcast_to(a, (d,)), np.broadcast_to(w, (d,))


def row_bits(widths: np.ndarray, d: int) -> int:
    """``B``: slot bits of one row of ``d`` channels."""
    return int(np.broadcast_to(np.asarray(widths, dtype=np.int64).reshape(-1), (d,)).sum())


def _slot_order(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(channel, level)`` of each chunk of a group, in stream order: channels ascending, each
    channel's levels ``0 .. w - 1``."""
    return np.repeat(np.arange(w.shape[0]), w), np.concatenate([np.arange(int(n)) for n in w])


def _group_bits(slot: np.ndarray, chan: np.ndarray, level: np.ndarray) -> np.ndarray:
    """The bits of the slot rows ``[rows, d]`` in stream order (groups of 8 rows, chunks of a group
    in ``(chan, level)`` order, a chunk's rows lowest first)."""
    out = [((slot[g0 : g0 + GROUP][:, chan] >> level) & 1).T.reshape(-1) for g0 in range(0, slot.shape[0], GROUP)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def max_rows(nbytes: int, bits_per_row: int) -> int:
    """Most coded rows of ``bits_per_row`` slot bits a stream of ``nbytes`` bytes can hold (bounded allocation)."""
    return 8 * max(nbytes - HEAD_BYTES, 0) // max(bits_per_row, 1)


def stream_bytes(rows: int, bits_per_row: int, n_x: int, n_xx: int) -> int:
    """Length of a stream of ``rows`` rows of ``bits_per_row`` slot bits with these escape counts."""
    return HEAD_BYTES + (rows * bits_per_row + 7) // 8 + (n_x + 1) // 2 + n_xx


def encode_reference(symbols: np.ndarray, starts: np.ndarray, widths: np.ndarray, nsym: int) -> bytes:
    """Reference encoder of the u8 rows ``symbols [rows, d]`` (channel ``i`` with ``starts[i]``,
    ``widths[i]``, or one entry for every channel)."""
    sym = np.asarray(symbols, dtype=np.uint8)
    if sym.ndim != 2:
        raise ValueError(f"symbols must be [rows, d], got shape {tuple(sym.shape)}")
    rows, d = sym.shape
    a, w = _per_channel(starts, widths, d, nsym)
    if sym.size and int(sym.max()) >= nsym:
        raise ValueError(f"symbol {int(sym.max())} is outside the table of {nsym} symbols")
    size = (1 << w) - 1
    chan, level = _slot_order(w)
    s = sym.astype(np.int64)
    inside = (s >= a) & (s < a + size)
    slot = np.where(inside, s - a, size)
    bits = _group_bits(slot, chan, level).astype(np.uint8)
    e = np.minimum(distance(s, a, w), FAR)[~inside]  # row-major: the escapes in stream order
    far = s[~inside][e == FAR].astype(np.uint8)
    return (np.array([e.size, far.size], dtype="<u4").tobytes() + np.packbits(bits, bitorder="little").tobytes()
            + pack_nibbles(e.astype(np.uint8)[None, :]).tobytes() + far.tobytes())


def decode_reference(data: bytes | memoryview, rows: int, starts: np.ndarray, widths: np.ndarray, nsym: int,
                     d: int) -> np.ndarray:
    """Reference decoder: u8 ``[rows, d]``; SlotsError unless ``data`` is exactly a valid stream."""
    buf = np.frombuffer(bytes(data), dtype=np.uint8)
    a, w = _per_channel(starts, widths, d, nsym)
    level1 = (rows * int(w.sum()) + 7) // 8
    if buf.size < HEAD_BYTES + level1:
        raise SlotsError(f"{rows} rows of {d} slots cannot fit in a {buf.size}-byte slot stream")
    n_x, n_xx = (int(v) for v in buf[:HEAD_BYTES].view("<u4"))
    if n_x > rows * d or n_xx > n_x or buf.size != stream_bytes(rows, int(w.sum()), n_x, n_xx):
        raise SlotsError("slot stream length does not match its rows and escape counts")
    bits = np.unpackbits(buf[HEAD_BYTES : HEAD_BYTES + level1], bitorder="little").astype(np.int64)
    if bits[rows * int(w.sum()):].any():
        raise SlotsError("slot stream has padding bits set")
    chan, level = _slot_order(w)
    slot = np.zeros((rows, d), dtype=np.int64)
    at = 0
    for g0 in range(0, rows, GROUP):
        g = min(GROUP, rows - g0)
        chunk = bits[at : at + g * chan.size].reshape(chan.size, g).T  # [g, chunks]
        at += g * chan.size
        np.add.at(slot, (np.repeat(np.arange(g0, g0 + g), chan.size), np.tile(chan, g)),
                  chunk.reshape(-1) << np.tile(level, g))
    size = (1 << w) - 1
    inside = slot < size
    if int((~inside).sum()) != n_x:
        raise SlotsError("slot stream's escape count does not match its escaped slots")
    nibbles = buf[HEAD_BYTES + level1 : HEAD_BYTES + level1 + (n_x + 1) // 2]
    try:
        e = unpack_nibbles(nibbles, 1, n_x, "slot stream")[0].astype(np.int64)
    except NibbleError as err:
        raise SlotsError(str(err)) from None
    far = buf[buf.size - n_xx :].astype(np.int64)
    if int((e == FAR).sum()) != n_xx:
        raise SlotsError("slot stream's far count does not match its distance nibbles")
    s = np.where(inside, a + slot, 0)
    ea, ew = np.broadcast_to(a, (rows, d))[~inside], np.broadcast_to(w, (rows, d))[~inside]
    top = ea + (1 << ew) - 1
    near = np.where(e % 2 == 0, top + e // 2, ea - (e + 1) // 2)
    out = np.where(e == FAR, 0, near)
    out[e == FAR] = far
    if (e == FAR).any():
        fs, fa, fw = far, ea[e == FAR], ew[e == FAR]
        if ((fs >= fa) & (fs < fa + (1 << fw) - 1)).any() or (distance(fs, fa, fw) < FAR).any():
            raise SlotsError("a far symbol is inside its window or near it (not coded canonically)")
    s[~inside] = out
    if ((s < 0) | (s >= nsym)).any():
        raise SlotsError("a code names a symbol outside the table")
    return s.astype(np.uint8)


def has_native() -> bool:
    """True when the C++ coder (``splitkernels._C``) is built."""
    return _C is not None and hasattr(_C, "slots_encode")


def vectorised() -> bool:
    """True when the C++ coder runs its fast vector path here (AVX-512 BW + VBMI + VBMI2 and GFNI: a
    group of 512 slots per handful of instructions). The AVX2 + BMI2 build runs at about a quarter
    of its speed, four times the generic build's."""
    return has_native() and _C.slots_isa() == "avx512"


def channel_arrays(starts: np.ndarray, widths: np.ndarray, d: int, nsym: int) -> tuple[np.ndarray, np.ndarray]:
    """``starts`` and ``widths`` as contiguous u8 ``[d]``, what the C++ coder and the fused passes
    take (one entry: the same for every channel); ValueError on a wrong length or range."""
    a, w = _per_channel(starts, widths, d, nsym)
    return np.ascontiguousarray(a, dtype=np.uint8), np.ascontiguousarray(w, dtype=np.uint8)


def encode(symbols: np.ndarray, raw: np.ndarray | None, starts: np.ndarray, widths: np.ndarray, nsym: int) -> bytes:
    """Stream of the rows of u8 ``symbols [T, d]`` whose ``raw`` flag is not set (C++ when built)."""
    sym = np.ascontiguousarray(np.asarray(symbols, dtype=np.uint8))
    if sym.ndim != 2 or sym.shape[1] == 0:
        raise ValueError(f"symbols must be [T, d] with d >= 1, got shape {tuple(sym.shape)}")
    if not has_native():
        return encode_reference(sym if raw is None else sym[~raw], starts, widths, nsym)
    t, d = sym.shape
    a, w = channel_arrays(starts, widths, d, nsym)
    flags = None if raw is None else np.ascontiguousarray(raw, dtype=np.uint8)
    rows = t if flags is None else t - int(flags.sum())
    out = np.empty(_C.slots_capacity(rows, d), dtype=np.uint8)
    try:
        n = _C.slots_encode(sym.ctypes.data, t, d, 0 if flags is None else flags.ctypes.data, a.ctypes.data,
                            w.ctypes.data, nsym, out.ctypes.data, out.shape[0])
    except ValueError:
        raise ValueError(f"a symbol is outside the table of {nsym} symbols or a parameter is out of range") from None
    return out[:n].tobytes()


def decode(data: bytes | memoryview, raw: np.ndarray, starts: np.ndarray, widths: np.ndarray, nsym: int, d: int,
           count_of: int = -1) -> tuple[np.ndarray, int]:
    """Symbols u8 ``[T, d]`` (rows flagged in ``raw [T]`` all 0) and how many coded ones equal ``count_of``.

    :class:`SlotsError` unless ``data`` is exactly a valid stream of the unflagged rows. The size
    check (``rows * B`` slot bits must fit) comes before anything is allocated."""
    t = raw.shape[0]
    rows = t - int(raw.sum())
    buf = np.frombuffer(data, dtype=np.uint8)
    a, w = channel_arrays(starts, widths, d, nsym)
    if (rows * int(w.astype(np.int64).sum()) + 7) // 8 > max(buf.shape[0] - HEAD_BYTES, 0):
        raise SlotsError(f"{rows} rows of {d} slots cannot fit in a {buf.shape[0]}-byte slot stream")
    if not has_native():
        out = np.zeros((t, d), dtype=np.uint8)
        out[~raw] = decode_reference(buf, rows, starts, widths, nsym, d)
        return out, int((out[~raw] == count_of).sum())
    flags = np.ascontiguousarray(raw, dtype=np.uint8)
    out = np.empty((t, d), dtype=np.uint8)
    err, count = _C.slots_decode(buf.ctypes.data, buf.shape[0], t, d, flags.ctypes.data, a.ctypes.data,
                                 w.ctypes.data, nsym, out.ctypes.data, count_of)
    if err:
        raise SlotsError(err)
    return out, count
