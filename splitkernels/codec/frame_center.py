"""Per-frame center offsets of codec v2 long frames (docs/FORMATS.md §5.4.2).

A config's ``center`` is each channel's median on the calibration text, so its tables expect the
channel's median code at ``kmax``. On another text the channels drift: on Gemma 3 270M split 13,
74% of the channels of a Botchan window had their median code away from ``kmax`` (SmolLM2 split
15: 56%), and every coder paid for it (the cost model of bench/results/codec_v2/s22: 0.11 bit
per element with rANS or slots on Gemma 3, 0.02-0.03 on SmolLM2). A long frame may therefore
carry one offset ``o_c`` in ``[-8, 7]`` steps per channel, and all its values then code and decode
around ``fp32(center_c + fp32(o_c * step_c))`` instead of ``center_c``.

The encoder's rule (any offsets decode; this is the rule both encoders here follow, so their
frames are byte for byte the same): frames of at least :data:`MIN_TOKENS` tokens sample every
``T // 64``-th token (:func:`sample_rows`), quantise those with the config's center, and take per
channel the lower median of the sampled coded tokens' symbols minus ``kmax``, clipped to the range
(:func:`fit_reference`; :func:`fit` is the same in one C++ call, and the host encoder samples,
quantises and fits in one). Frames of all-zero offsets (or of a moved center beyond the fp32
range), or shorter ones, carry none: the section costs 4 bits per channel (0.0078 bit per element
at 512 tokens, 0.016 at 256, where SmolLM2 still gains).
"""
from __future__ import annotations

import numpy as np

from .._native import load
from .config_v2 import CodecConfigV2
from .nibble import NibbleError, pack_nibbles, unpack_nibbles

MIN_TOKENS = 256  # shorter frames carry no offsets
SAMPLE_ROWS = 64  # about this many tokens are sampled
LOW, HIGH = -8, 7  # an offset is one signed nibble
MAX_FAST_ROWS = 255  # the C++ fit counts in bytes; a frame samples at most 80 tokens

_C, _ = load("_C")


def sample_rows(t: int) -> np.ndarray:
    """Indices of the tokens a frame of ``t`` tokens samples: every ``max(1, t // SAMPLE_ROWS)``-th from 0."""
    return np.arange(0, t, max(1, t // SAMPLE_ROWS))


def fit_reference(symbols: np.ndarray, raw: np.ndarray, kmax: int) -> np.ndarray | None:
    """Offsets (i8 ``[d]``) from the symbols ``[n, d]`` of the sampled tokens quantised with the
    config's center and their raw flags ``[n]``: the lower median of the coded tokens' symbols
    minus ``kmax``, clipped to ``[LOW, HIGH]``; None when every offset is 0 or no sampled token is coded."""
    coded = np.asarray(symbols)[~np.asarray(raw, dtype=bool)]
    if coded.shape[0] == 0:
        return None
    median = np.sort(coded, axis=0)[(coded.shape[0] - 1) // 2].astype(np.int64)
    offsets = np.clip(median - kmax, LOW, HIGH).astype(np.int8)
    return offsets if offsets.any() else None


def fit(symbols: np.ndarray, raw: np.ndarray, kmax: int) -> np.ndarray | None:
    """:func:`fit_reference` in one C++ call when the extension is built (a bisection over the 16
    offsets with byte compares: 64 x 4096 samples in microseconds, where the column sort takes
    milliseconds), for the samples a GPU quantised; the same offsets."""
    symbols = np.ascontiguousarray(symbols, dtype=np.uint8)
    if _C is None or symbols.ndim != 2 or not 1 <= symbols.shape[0] <= MAX_FAST_ROWS:
        return fit_reference(symbols, raw, kmax)
    (n, d), raw8 = symbols.shape, np.ascontiguousarray(raw, dtype=np.uint8)
    if raw8.shape != (n,):
        raise ValueError(f"raw must hold one flag per sampled token ({n}), got shape {raw8.shape}")
    offsets = np.empty(d, dtype=np.int8)
    found = _C.v2_fit_offsets(symbols.ctypes.data, raw8.ctypes.data, n, d, kmax, offsets.ctypes.data)
    return offsets if found else None


def centers(config: CodecConfigV2, offsets: np.ndarray | None) -> np.ndarray:
    """The frame's centers: ``fp32(center + fp32(offset * step))`` per channel (fp32 ``[d]``, two
    IEEE roundings, no fused multiply-add), or the config's own without offsets."""
    if offsets is None:
        return config.center_array()
    with np.errstate(over="ignore"):  # a forged offset may overflow; the parser checks finiteness
        return config.center_array() + np.asarray(offsets, dtype=np.float32) * config.step_array()


def section_bytes(d: int) -> int:
    """Bytes of the offset section of ``d`` channels: one nibble each."""
    return (d + 1) // 2


def pack(offsets: np.ndarray) -> bytes:
    """The section: offset ``c`` as a two's complement nibble, the even channel in the low nibble,
    a last padding nibble 0."""
    return pack_nibbles((np.asarray(offsets, dtype=np.int8).astype(np.uint8) & 15)[None, :]).tobytes()


def unpack(section: bytes | memoryview, d: int) -> tuple[np.ndarray | None, str]:
    """The offsets (i8 ``[d]``) of a section of :func:`section_bytes` bytes, and "" or why it is
    invalid (a set padding nibble, or every offset 0: such a frame carries no section)."""
    try:
        nib = unpack_nibbles(np.frombuffer(section, dtype=np.uint8), 1, d, "center offset section")[0]
    except NibbleError as exc:
        return None, str(exc)
    offsets = ((nib.astype(np.int16) ^ 8) - 8).astype(np.int8)
    if not offsets.any():
        return None, "center offset section holds only zeros (such a frame carries none)"
    return offsets, ""
