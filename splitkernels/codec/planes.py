"""Bit-plane Rice coder: the fastest coder of codec v2's long frames at Rice's bits (docs/FORMATS.md §5.8).

The Rice coder (``rice``) spends a unary quotient and a ``k``-bit remainder on each symbol's zigzag
distance ``u`` from its channel's centre, but runs them through 32 interleaved rANS-style states, one
symbol per lane step. This coder sends the same codes (the same ``(centre, k)`` per channel,
``rice.channel_params``) as **bit planes** of a whole token, so that 64 symbols move per machine
instruction (a compare into a mask, then ``pext`` on encode and ``pdep`` on decode):

* the remainders, in blocks of 64 channels: for each bit level ``l < 7``, bit ``l`` of ``u`` of every
  channel of the block whose ``k > l``;
* the quotients ``q' = min(q, top)``, unary across planes: plane ``j`` holds ``q' > j`` for every
  channel with ``q' >= j``, in channel order, until no channel is left.

Per channel ``top = min(16 - k, 255 >> k)`` and ``E = top << k`` (at most 224, so ``u`` fits a byte
lane); ``u >= E`` is an exception: ``q' = top``, zero remainder bits, and the symbol as a byte.
A code costs ``k + q' + 1`` bits (plus 8 for an exception's byte): Rice's bits, to within the
exceptions (one bit more each, and more of them at ``k >= 5``).

Stream layout (little-endian): ``n_x u32 | bits (row by row: remainders, then quotient planes),
zero-padded to a byte | n_x exception bytes in symbol order``.

This module is the plain-NumPy reference (ground truth for tests and golden vectors). ``encode``
and ``decode`` use the C++ coder (``splitkernels._C``) when it is built; both give identical bytes.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._native import load
from . import rans, rice

BLOCK = 64  # channels per remainder block
MAX_K = rice.MAX_K
HEAD_BYTES = 4

_C, _ = load("_C")


class PlanesError(ValueError):
    """A bit-plane stream is inconsistent with its parameters, shape or counts."""


def tops(ks: np.ndarray) -> np.ndarray:
    """Per channel ``top = min(16 - k, 255 >> k)``: quotients of ``top`` or more are exceptions."""
    k = np.asarray(ks, dtype=np.int64)
    return np.minimum(16 - k, 255 >> k)


def code_bits(freqs: Sequence[int], centre: int, k: int) -> np.ndarray:
    """Bits each symbol of a table of ``len(freqs)`` symbols costs (an exception: ``top + 1 + k`` bits and its byte)."""
    u = rice.zigzag(np.arange(len(freqs), dtype=np.int64) - centre)
    top = int(tops(np.array([k]))[0])
    return np.where(u >> k < top, (u >> k) + 1 + k, top + 1 + k + 8)


def expected_bits(tables: Sequence[Sequence[int]]) -> float:
    """Bits per symbol this coder spends on symbols drawn from the tables, equally weighted (head aside)."""
    return rans.mean_code_bits(tables, lambda t: code_bits(t, *rice.table_params(t)))


def max_symbols(stream_bytes: int) -> int:
    """Most symbols a stream of ``stream_bytes`` bytes can hold (every code has at least one
    quotient bit): the bound checked before allocating."""
    return 8 * max(stream_bytes, 0)


def _per_channel(centres: np.ndarray, ks: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """``centres`` and ``ks`` as ``int64 [d]`` (one entry: the same for every channel)."""
    c, k = np.asarray(centres, dtype=np.int64).reshape(-1), np.asarray(ks, dtype=np.int64).reshape(-1)
    if c.size != k.size or c.size not in (1, d):
        raise ValueError(f"centres and ks must have 1 or d = {d} entries, got {c.size} and {k.size}")
    if (k > MAX_K).any() or (k < 0).any():
        raise ValueError(f"a parameter is out of range: k must be in 0..{MAX_K}")
    return np.broadcast_to(c, (d,)), np.broadcast_to(k, (d,))


def _remainder_order(ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(channel, level)`` of each remainder bit of a row, in stream order: per block of 64
    channels, level 0 to 6, the block's channels whose ``k > level`` ascending."""
    d = ks.shape[0]
    chans, levels = [], []
    for b0 in range(0, d, BLOCK):
        block = np.arange(b0, min(b0 + BLOCK, d))
        for level in range(MAX_K):
            sel = block[ks[block] > level]
            chans.append(sel)
            levels.append(np.full(sel.size, level))
    return np.concatenate(chans), np.concatenate(levels)


def encode_reference(symbols: np.ndarray, centres: np.ndarray, ks: np.ndarray, nsym: int) -> bytes:
    """Reference encoder of the u8 rows ``symbols [rows, d]`` (channel ``i`` with ``centres[i]``,
    ``ks[i]``, or one entry for every channel)."""
    sym = np.asarray(symbols, dtype=np.uint8)
    if sym.ndim != 2:
        raise ValueError(f"symbols must be [rows, d], got shape {tuple(sym.shape)}")
    rows, d = sym.shape
    c, k = _per_channel(centres, ks, d)
    if sym.size and int(sym.max()) >= nsym:
        raise ValueError(f"symbol {int(sym.max())} is outside the table of {nsym} symbols")
    top = tops(k)
    rem_chan, rem_level = _remainder_order(k)
    bits: list[np.ndarray] = []
    excs: list[np.ndarray] = []
    for r in range(rows):
        u = rice.zigzag(sym[r].astype(np.int64) - c)
        exc = u >= top << k
        excs.append(sym[r][exc])
        q = np.where(exc, top, u >> k)
        rem = np.where(exc, 0, u)
        bits.append((rem[rem_chan] >> rem_level) & 1)
        alive = np.ones(d, dtype=bool)
        j = 0
        while alive.any():
            bits.append((q[alive] > j).astype(np.int64))
            alive &= q > j
            j += 1
    stream = np.concatenate(bits).astype(np.uint8) if bits else np.zeros(0, dtype=np.uint8)
    x = np.concatenate(excs) if excs else np.zeros(0, dtype=np.uint8)
    return (np.array([x.size], dtype="<u4").tobytes() + np.packbits(stream, bitorder="little").tobytes()
            + x.astype(np.uint8).tobytes())


def decode_reference(data: bytes | memoryview, rows: int, centres: np.ndarray, ks: np.ndarray, nsym: int,
                     d: int) -> np.ndarray:
    """Reference decoder: u8 ``[rows, d]``; PlanesError unless ``data`` is exactly a valid stream."""
    buf = np.frombuffer(bytes(data), dtype=np.uint8)
    if rows * d > max_symbols(buf.size):
        raise PlanesError(f"{rows} rows of {d} symbols cannot fit in a {buf.size}-byte bit-plane stream")
    if buf.size < HEAD_BYTES:
        raise PlanesError("bit-plane stream is shorter than its exception count")
    c, k = _per_channel(centres, ks, d)
    n_x = int(buf[:HEAD_BYTES].view("<u4")[0])
    if n_x > rows * d or n_x > buf.size - HEAD_BYTES:
        raise PlanesError(f"bit-plane stream claims {n_x} exceptions, more than it can hold")
    bits = np.unpackbits(buf[HEAD_BYTES : buf.size - n_x], bitorder="little").astype(np.int64)
    excs = buf[buf.size - n_x :].astype(np.int64)
    top = tops(k)
    edge = top << k
    rem_chan, rem_level = _remainder_order(k)
    out = np.empty((rows, d), dtype=np.uint8)
    pos, e = 0, 0

    def take(n: int) -> np.ndarray:
        nonlocal pos
        if pos + n > bits.size:
            raise PlanesError("bit-plane stream ends early")
        pos += n
        return bits[pos - n : pos]

    for r in range(rows):
        u = np.zeros(d, dtype=np.int64)
        np.add.at(u, rem_chan, take(rem_chan.size) << rem_level)
        q = np.zeros(d, dtype=np.int64)
        alive = np.ones(d, dtype=bool)
        while alive.any():
            if (q > 16).any():
                raise PlanesError("a quotient runs past 16 planes")
            more = np.zeros(d, dtype=bool)
            more[alive] = take(int(alive.sum())) == 1
            q += more
            alive = more
        if (q > top).any():
            raise PlanesError("a quotient is above its channel's top")
        u += q << k
        exc = q == top
        if (u[exc] != edge[exc]).any():
            raise PlanesError("an exception carries remainder bits (not coded canonically)")
        s = c + np.where(u % 2 == 0, u >> 1, -((u + 1) >> 1))
        n = int(exc.sum())
        if e + n > excs.size:
            raise PlanesError("bit-plane stream has fewer exception bytes than exceptions")
        xs = excs[e : e + n]
        e += n
        if ((xs >= nsym) | (rice.zigzag(xs - c[exc]) < edge[exc])).any():
            raise PlanesError("an exception names a symbol outside the table or is not coded canonically")
        s[exc] = xs
        if ((s < 0) | (s >= nsym)).any():
            raise PlanesError("a code names a symbol outside the table")
        out[r] = s
    if e != excs.size:
        raise PlanesError("bit-plane stream has unread exception bytes")
    if (bits.size + 7) // 8 != (pos + 7) // 8 or bits[pos:].any():
        raise PlanesError("bit-plane stream has unread bytes or padding bits set")
    return out


def has_native() -> bool:
    """True when the C++ coder (``splitkernels._C``) is built."""
    return _C is not None and hasattr(_C, "planes_encode")


def vectorised() -> bool:
    """True when the C++ coder runs its vector path here (AVX-512 BW + VBMI2 and BMI2): 64 symbols
    per mask instruction. Elsewhere the generic build goes lane by lane (about scalar Rice's speed)
    and the Rice coder is the fast choice."""
    return has_native() and _C.planes_isa() == "avx512"


def channel_arrays(centres: np.ndarray, ks: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """``centres`` and ``ks`` as contiguous u8 ``[d]``, what the C++ coder and the fused passes take
    (one entry: the same for every channel); ValueError on a wrong length or a ``k`` above 7."""
    c, k = _per_channel(centres, ks, d)
    return np.ascontiguousarray(c, dtype=np.uint8), np.ascontiguousarray(k, dtype=np.uint8)


def encode(symbols: np.ndarray, raw: np.ndarray | None, centres: np.ndarray, ks: np.ndarray, nsym: int) -> bytes:
    """Stream of the rows of u8 ``symbols [T, d]`` whose ``raw`` flag is not set (C++ when built)."""
    sym = np.ascontiguousarray(np.asarray(symbols, dtype=np.uint8))
    if sym.ndim != 2 or sym.shape[1] == 0:
        raise ValueError(f"symbols must be [T, d] with d >= 1, got shape {tuple(sym.shape)}")
    if not has_native():
        return encode_reference(sym if raw is None else sym[~raw], centres, ks, nsym)
    t, d = sym.shape
    c, k = channel_arrays(centres, ks, d)
    flags = None if raw is None else np.ascontiguousarray(raw, dtype=np.uint8)
    rows = t if flags is None else t - int(flags.sum())
    out = np.empty(_C.planes_capacity(rows, d), dtype=np.uint8)
    try:
        n = _C.planes_encode(sym.ctypes.data, t, d, 0 if flags is None else flags.ctypes.data, c.ctypes.data,
                             k.ctypes.data, nsym, out.ctypes.data, out.shape[0])
    except ValueError:
        raise ValueError(f"a symbol is outside the table of {nsym} symbols or a parameter is out of range") from None
    return out[:n].tobytes()


def decode(data: bytes | memoryview, raw: np.ndarray, centres: np.ndarray, ks: np.ndarray, nsym: int, d: int,
           count_of: int = -1) -> tuple[np.ndarray, int]:
    """Symbols u8 ``[T, d]`` (rows flagged in ``raw [T]`` all 0) and how many coded ones equal ``count_of``.

    :class:`PlanesError` unless ``data`` is exactly a valid stream of the unflagged rows. The size
    check against ``max_symbols`` comes before anything is allocated."""
    t = raw.shape[0]
    rows = t - int(raw.sum())
    buf = np.frombuffer(data, dtype=np.uint8)
    if rows * d > max_symbols(buf.shape[0]):
        raise PlanesError(f"{rows} rows of {d} symbols cannot fit in a {buf.shape[0]}-byte bit-plane stream")
    if not has_native():
        out = np.zeros((t, d), dtype=np.uint8)
        out[~raw] = decode_reference(buf, rows, centres, ks, nsym, d)
        return out, int((out[~raw] == count_of).sum())
    c, k = channel_arrays(centres, ks, d)
    flags = np.ascontiguousarray(raw, dtype=np.uint8)
    out = np.empty((t, d), dtype=np.uint8)
    err, count = _C.planes_decode(buf.ctypes.data, buf.shape[0], t, d, flags.ctypes.data, c.ctypes.data,
                                  k.ctypes.data, nsym, out.ctypes.data, count_of)
    if err:
        raise PlanesError(err)
    return out, count
