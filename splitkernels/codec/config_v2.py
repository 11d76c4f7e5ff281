"""Codec v2 settings: the calibrated, session-static part of the codec (docs/FORMATS.md §5).

A :class:`CodecConfigV2` is produced by :func:`splitkernels.codec.calibrate` for one model and
split layer. It is frozen, serialises to JSON (``to_json``/``from_json``) and has a fingerprint that
every v2 frame's CRC covers, so a frame is never decoded with the wrong tables.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from . import nibble, planes, rans, rice, slots
from .predict import EmbeddingPrediction

CONFIG_VERSION = 2
CONFIG_VERSION_CLASSES = 3  # the canonical layout with channel-class tables
CONFIG_VERSION_POSITIONS = 4  # version 3's layout (0 classes allowed) plus position shifts
CONFIG_VERSION_PREDICTION = 5  # version 4's layout (0 bands allowed) plus the token prediction
CONFIG_VERSIONS = (CONFIG_VERSION, CONFIG_VERSION_CLASSES, CONFIG_VERSION_POSITIONS, CONFIG_VERSION_PREDICTION)
MAX_POSITION_BANDS = 16  # band 0 is position 0, band b >= 1 positions [2**(b-1), 2**b)
MAX_SHIFT = 6  # a shifted value's fine code stays within +-127 * 2**6 (exact in fp32)
MAX_KMAX = (rans.MAX_SYMBOLS - 2) // 2  # symbols 0..2K are codes -K..K, 2K+1 is the escape
MAX_D = 1 << 20  # widest hidden state a serialised config may describe
TOKEN_SHIFT_END = 128  # token shifts apply to positions below this
MAX_TOKEN_SHIFTS = 64
_TOKEN_SHIFT = struct.Struct("<IB")
_CANON_HEAD = struct.Struct("<BIII")
_CLASS_COUNT = struct.Struct("<I")
_BAND_COUNT = struct.Struct("<B")
# A frame's step scale ``g`` (docs/FORMATS.md §5.4.3) multiplies every step by fp32(2**(g/4)): a
# quarter octave changes the codes' entropy by about a quarter bit per element.
MAX_FRAME_SCALE = 8


STEP_RULE = "every step entry must be a finite fp32 value > 0 with a finite fp32 reciprocal"
# A view's own per-step caches (addresses of its step arrays); everything else it shares with its config.
_STEP_CACHES = ("fused_frame_args", "fused_decode_args")


def _steps_valid(step: np.ndarray) -> bool:
    with np.errstate(divide="ignore", over="ignore"):
        return bool(np.isfinite(step).all() and (step > 0).all() and np.isfinite(np.float32(1.0) / step).all())


def _subnormal_when_shifted(smallest_step: float, shift: int) -> bool:
    """Whether ``smallest_step * 2**-shift`` (a finer step of §5.2) falls below fp32's normal range."""
    return smallest_step * 2.0 ** -shift < float(np.finfo(np.float32).tiny)


def scale_factor(scale: int) -> np.float32:
    """``fp32(2**(scale/4))``: what a frame scale multiplies every step by (§5.4.3)."""
    if isinstance(scale, bool) or not isinstance(scale, int) or not -MAX_FRAME_SCALE <= scale <= MAX_FRAME_SCALE:
        raise ValueError(f"frame scale must be an int in [-{MAX_FRAME_SCALE}, {MAX_FRAME_SCALE}], got {scale!r}")
    return np.float32(2.0 ** (scale / 4))


def position_band(position: int) -> int:
    """Band of a token position: 0 for position 0, else ``position.bit_length()`` (band ``b`` holds
    positions ``[2**(b-1), 2**b)``)."""
    return int(position).bit_length()


def band_shifts(position_shift: tuple[int, ...], start: int, n: int) -> np.ndarray:
    """Shifts (int64) of positions ``start .. start + n - 1`` under ``position_shift`` (0 beyond it)."""
    table = np.asarray(tuple(position_shift) + (0,), dtype=np.int64)
    bands = np.array([position_band(p) for p in range(start, start + n)], dtype=np.int64)
    return table[np.minimum(bands, len(table) - 1)]


def check_position_shift(position_shift) -> tuple[int, ...]:
    """``position_shift`` as a tuple, or ValueError unless it holds at most ``MAX_POSITION_BANDS``
    ints in [0, ``MAX_SHIFT``] and does not end in 0."""
    shifts = tuple(position_shift)
    if len(shifts) > MAX_POSITION_BANDS or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_SHIFT
                                               for v in shifts):
        raise ValueError(f"position_shift must hold at most {MAX_POSITION_BANDS} ints in [0, {MAX_SHIFT}], got {shifts!r}")
    if shifts and shifts[-1] == 0:
        raise ValueError("position_shift must not end in 0 (trailing bands of shift 0 are implied)")
    return shifts


def shift_end_of(position_shift: tuple[int, ...]) -> int:
    """First position from which every token has shift 0 under ``position_shift`` (0 when empty)."""
    return 1 << (len(position_shift) - 1) if position_shift else 0


@dataclass(frozen=True)
class CodecConfigV2:
    """Static codec v2 state for ``d`` channels.

    * ``center``: per-channel offset (fp32, finite), the calibrated channel median.
    * ``step``: per-channel quantiser step (fp32 values, > 0). A value ``x`` of channel ``c`` has
      ``v = fp32(fp32(x) - center[c]) * fp32(1 / step[c])``; ``|v| <= kmax`` codes as ``rint(v)``, anything else is an
      *escape*: the exact value travels in the input dtype. The step is the calibrated channel
      scale times one global step in the equalised domain.
    * ``kmax``: largest code magnitude (1..127); the alphabet is ``2 * kmax + 2`` symbols.
    * ``freqs``: static rANS table over that alphabet (sum ``2**14``, each 1..``2**13``): the table of
      every channel when there are no classes, and the nibble coder's window either way.
    * ``class_freqs``, ``channel_class``: optional channel classes, ``K`` tables over the same
      alphabet and the class of each of the ``d`` channels; rANS then codes channel ``c`` with
      ``class_freqs[channel_class[c]]``. Empty (the default) means one table for all.
    * ``raw_limit``: a token with more than this many escapes travels raw (attention sinks).
    * ``position_shift``: optional finer steps for early positions: entry ``b``, ``s`` in
      0..``MAX_SHIFT``, divides the step of every token in position band ``b`` (:func:`position_band`) by ``2**s``;
      the extra ``shift`` low bits of each code travel as a residual beside the coarse symbol.
      Empty (the default) means one step for every position; the last entry is never 0.
    * ``prediction``: optional :class:`~splitkernels.codec.predict.EmbeddingPrediction`: the codec
      then codes ``fp32(fp32(x) - fp32(gain * E[token]))`` and every frame carries its token ids
      (docs/FORMATS.md §5.2.1); encoder and decoder need the same embedding table ``E``.
    * ``token_shift``: optional, with a prediction only: ``(id, shift)`` pairs, ids increasing: a
      token with that id at a position below :data:`TOKEN_SHIFT_END` codes with the larger of its
      position's shift and this one (§5.2.2; the ids travel in the frame, so both ends know them).
    * ``info``: calibration notes (target bits, estimated bits, KL proxy); not part of the codec,
      not in the fingerprint.
    """

    center: tuple[float, ...]
    step: tuple[float, ...]
    kmax: int
    freqs: tuple[int, ...]
    raw_limit: int
    class_freqs: tuple[tuple[int, ...], ...] = ()
    channel_class: tuple[int, ...] = ()
    position_shift: tuple[int, ...] = ()
    prediction: EmbeddingPrediction | None = None
    token_shift: tuple[tuple[int, int], ...] = ()
    info: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        step = tuple(float(np.float32(s)) for s in self.step)
        center = tuple(float(np.float32(c)) for c in self.center)
        object.__setattr__(self, "step", step)
        object.__setattr__(self, "center", center)
        object.__setattr__(self, "freqs", tuple(int(f) for f in self.freqs))
        if not step:
            raise ValueError("step must have one entry per channel (d >= 1)")
        if not _steps_valid(np.asarray(step, dtype=np.float32)):
            raise ValueError(STEP_RULE)
        if len(center) != len(step) or not all(math.isfinite(c) for c in center):
            raise ValueError(f"center must have d = {len(step)} finite entries, got {len(center)}")
        if isinstance(self.kmax, bool) or not isinstance(self.kmax, int) or not 1 <= self.kmax <= MAX_KMAX:
            raise ValueError(f"kmax must be an int in [1, {MAX_KMAX}], got {self.kmax!r}")
        if len(self.freqs) != 2 * self.kmax + 2:
            raise ValueError(f"freqs must have 2 * kmax + 2 = {2 * self.kmax + 2} entries, got {len(self.freqs)}")
        rans.check_freqs(self.freqs)
        if isinstance(self.raw_limit, bool) or not isinstance(self.raw_limit, int) or not 0 <= self.raw_limit <= self.d:
            raise ValueError(f"raw_limit must be an int in [0, d={self.d}], got {self.raw_limit!r}")
        if bool(self.class_freqs) != bool(self.channel_class):
            raise ValueError("class_freqs and channel_class must be given together")
        shifts = check_position_shift(self.position_shift)
        if shifts and _subnormal_when_shifted(min(step), max(shifts)):
            raise ValueError("position_shift would make a step subnormal (the finer steps must stay exact fp32 values)")
        object.__setattr__(self, "position_shift", shifts)
        if self.prediction is not None:
            if not isinstance(self.prediction, EmbeddingPrediction):
                raise ValueError(f"prediction must be an EmbeddingPrediction or None, got {type(self.prediction).__name__}")
            if self.prediction.d != self.d:
                raise ValueError(f"prediction gain must have d = {self.d} entries, got {self.prediction.d}")
        pairs = tuple((int(i), int(v)) for i, v in self.token_shift)
        if pairs:
            if self.prediction is None:
                raise ValueError("token_shift needs a prediction (the frames' token ids)")
            ids = [i for i, _ in pairs]
            if len(pairs) > MAX_TOKEN_SHIFTS or any(b <= a for a, b in zip(ids, ids[1:])) or ids[0] < 0 \
                    or ids[-1] >= self.prediction.vocab or not all(1 <= v <= MAX_SHIFT for _, v in pairs):
                raise ValueError(f"token_shift must hold at most {MAX_TOKEN_SHIFTS} (id, shift) pairs, ids increasing "
                                 f"in [0, {self.prediction.vocab}), shifts in [1, {MAX_SHIFT}]")
            if _subnormal_when_shifted(min(step), max(v for _, v in pairs)):
                raise ValueError("token_shift would make a step subnormal (the finer steps must stay exact fp32 values)")
        object.__setattr__(self, "token_shift", pairs)
        object.__setattr__(self, "_token_shifts", dict(pairs))
        # What the rANS coder codes with, built once (one-token frames then pay nothing for it).
        object.__setattr__(self, "_rans", rans.as_class_tables(self.freqs))
        if self.class_freqs:
            if len(self.channel_class) != self.d:
                raise ValueError(f"channel_class must have d = {self.d} entries, got {len(self.channel_class)}")
            if any(len(t) != len(self.freqs) for t in self.class_freqs):
                raise ValueError(f"every class_freqs table must have 2 * kmax + 2 = {len(self.freqs)} entries")
            classes = rans.ClassTables(self.class_freqs, self.channel_class)
            object.__setattr__(self, "class_freqs", classes.tables)
            object.__setattr__(self, "channel_class", classes.table_of)
            object.__setattr__(self, "_rans", classes)
        # Read-only fp32 arrays, built once: encoders use them on every call.
        arrays = {"center": np.asarray(center, dtype=np.float32), "step": np.asarray(step, dtype=np.float32)}
        arrays["inv"] = np.float32(1.0) / arrays["step"]
        for a in arrays.values():
            a.setflags(write=False)
        object.__setattr__(self, "_arrays", arrays)
        # Hashed once: every frame's CRC starts from the digest.
        object.__setattr__(self, "_digest", hashlib.sha256(self.canonical_bytes()).digest())
        object.__setattr__(self, "_crc_seed", zlib.crc32(self._digest))
        object.__setattr__(self, "_frame_scale", 0)
        object.__setattr__(self, "_views", {0: self})

    def scaled(self, scale: int) -> "CodecConfigV2":
        """The view of this config that codes a frame with step scale ``scale`` (§5.4.3): every
        step is ``fp32(step * scale_factor(scale))``, everything else (tables, shifts, prediction,
        digest and CRC seed) is this config's. Built once per scale; ``scaled(0)`` is the config
        itself. ValueError when the scale is out of range or makes a step invalid (not finite,
        no finite reciprocal, subnormal under the config's largest shift). A view only codes
        frames: it is not a session config (:meth:`to_dict` refuses it)."""
        base = self.base
        view = base._views.get(scale)
        if view is not None:
            return view
        with np.errstate(over="ignore"):  # an overflow is refused below
            step = base.step_array() * scale_factor(scale)  # one fp32 multiply per channel
        largest_shift = max((*base.position_shift, *(v for _, v in base.token_shift)), default=0)
        if not _steps_valid(step) or _subnormal_when_shifted(float(step.min()), largest_shift):
            raise ValueError(f"frame scale {scale} makes a step of codec config {base.fingerprint[:8]} invalid: "
                             f"{STEP_RULE}, not subnormal under the config's largest shift")
        # The tables, coder parameters and their caches are the config's; only the steps differ.
        view = object.__new__(CodecConfigV2)
        view.__dict__.update({k: v for k, v in base.__dict__.items() if k not in _STEP_CACHES})
        inv = np.float32(1.0) / step
        step.setflags(write=False)
        inv.setflags(write=False)
        view.__dict__.update(step=tuple(step.tolist()), info={}, _frame_scale=scale, _base=base, _views={},
                             _arrays={"center": base.center_array(), "step": step, "inv": inv})
        base._views[scale] = view
        return view

    @property
    def frame_scale(self) -> int:
        """The frame scale this config codes with: 0 for a session config, ``g`` for :meth:`scaled` (``g``)."""
        return self._frame_scale

    @property
    def base(self) -> "CodecConfigV2":
        """The session config this is a frame view of (itself when it is one)."""
        return getattr(self, "_base", self)

    @property
    def d(self) -> int:
        return len(self.step)

    @property
    def shift_end(self) -> int:
        """First position from which every token has shift 0 (0 without position or token shifts)."""
        return max(shift_end_of(self.position_shift), TOKEN_SHIFT_END if self.token_shift else 0)

    def row_shifts(self, start: int, t: int, tokens=None) -> np.ndarray:
        """Shifts (int64) of the leading rows of a frame of ``t`` tokens from position ``start`` that
        lie before :attr:`shift_end` (an empty array when none does); with token shifts, ``tokens``
        (the frame's ids) must be given."""
        n = max(0, min(t, self.shift_end - start))
        if n == 0:  # the common case, kept cheap: every long frame asks
            return np.zeros(0, dtype=np.int64)
        shifts = band_shifts(self.position_shift, start, n)
        if self.token_shift and n:
            if tokens is None:
                raise ValueError("this codec config's token shifts need the frame's token ids")
            table = self._token_shifts
            ids = tokens.tolist() if isinstance(tokens, (torch.Tensor, np.ndarray)) else list(tokens)
            for r in range(min(n, TOKEN_SHIFT_END - start)):
                shifts[r] = max(shifts[r], table.get(ids[r], 0))
        return shifts

    @property
    def escape_symbol(self) -> int:
        return 2 * self.kmax + 1

    @property
    def rans_tables(self) -> rans.ClassTables:
        """What the rANS coder codes with: ``freqs`` as one class, or the channel-class tables."""
        return self._rans

    @functools.cached_property
    def rice_params(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``(centres, ks)`` (u8) of the Rice coder from the rANS coder's tables
        (docs/FORMATS.md §5.7); one entry without channel classes. Built on first use."""
        return rice.channel_params(self._rans.tables, self._rans.table_of)

    @functools.cached_property
    def slot_params(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``(starts, widths)`` (u8) of the slot coder from the rANS coder's tables
        (docs/FORMATS.md §5.9); one entry without channel classes. Built on first use."""
        return slots.channel_params(self._rans.tables, self._rans.table_of)

    @functools.cached_property
    def fused_params(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The Rice (``"planes"``) and slot (``"slots"``) parameters as contiguous u8 ``[d]`` arrays,
        what the fused C++ passes take; built once, since every long frame asks."""
        return {"planes": planes.channel_arrays(*self.rice_params, self.d),
                "slots": slots.channel_arrays(*self.slot_params, self.d, len(self.freqs))}

    @functools.cached_property
    def fused_frame_args(self) -> dict[str, tuple]:
        """Per fused coder (``"nibble"``, ``"planes"``, ``"slots"``), the arguments after ``x, dtype,
        T, d, coder`` of the C++ long-frame encoder (``_C.v2_encode_long_frame``): the addresses of
        this config's center, inverse step and step arrays (kept alive by it), kmax, raw_limit, the
        coder's parameters, the CRC seed and the frame scale. Read once: numpy's ``.ctypes.data`` costs a microsecond per array per call."""
        head = (self.center_array().ctypes.data, self.inv_step_array().ctypes.data, self.step_array().ctypes.data,
                self.kmax, self.raw_limit)
        args = {"nibble": head + (nibble.window_start(self.freqs), 0, 0, self.crc_seed, self.frame_scale)}
        for name, (first, second) in self.fused_params.items():
            args[name] = head + (0, first.ctypes.data, second.ctypes.data, self.crc_seed, self.frame_scale)
        return args

    @functools.cached_property
    def fused_decode_args(self) -> tuple:
        """The arguments after the frame of the C++ long-frame decoder (``_C.v2_decode_long_frame``):
        the CRC seed, d, kmax, the addresses of step and center, the nibble window start and the
        addresses of the bit planes' and slots' per-channel arrays and the frame scale; read once, as :attr:`fused_frame_args`."""
        (centre, k), (start, width) = self.fused_params["planes"], self.fused_params["slots"]
        return (self.crc_seed, self.d, self.kmax, self.step_array().ctypes.data, self.center_array().ctypes.data,
                nibble.window_start(self.freqs), centre.ctypes.data, k.ctypes.data, start.ctypes.data,
                width.ctypes.data, self.frame_scale)

    @functools.cached_property
    def slot_row_bits(self) -> int:
        """Slot bits of one coded row (``slots.row_bits``)."""
        return slots.row_bits(self.slot_params[1], self.d)

    @functools.cached_property
    def rice_extra_bits(self) -> float:
        """Bits per symbol the Rice coder costs over static rANS on these tables
        (``rice.extra_bits``); the coder rule asks on every long frame, so it is kept."""
        return rice.extra_bits(self._rans.tables)

    def center_array(self) -> np.ndarray:
        """``center`` as a read-only fp32 array."""
        return self._arrays["center"]

    def step_array(self) -> np.ndarray:
        """``step`` as a read-only fp32 array."""
        return self._arrays["step"]

    def inv_step_array(self) -> np.ndarray:
        """``fp32(1 / step)`` with one IEEE fp32 division per channel (the encoder multiplies by it)."""
        return self._arrays["inv"]

    @property
    def version(self) -> int:
        """Canonical layout: 2 (one table), 3 (channel-class tables), 4 (position shifts) or 5 (token prediction)."""
        if self.prediction is not None:
            return CONFIG_VERSION_PREDICTION
        if self.position_shift:
            return CONFIG_VERSION_POSITIONS
        return CONFIG_VERSION_CLASSES if self.class_freqs else CONFIG_VERSION

    def canonical_bytes(self) -> bytes:
        """The bytes the fingerprint hashes: version, d, kmax, raw_limit, centers and steps (f32),
        freqs (u16); with classes (or position shifts) also the class count (u32), the channel classes (u8)
        and their tables (u16); with position shifts then the band count (u8) and the shifts (u8);
        with a prediction the band count and shifts always, then the prediction's bytes, the token
        shift count (u8) and each ``(u32 id, u8 shift)``."""
        head = _CANON_HEAD.pack(self.version, self.d, self.kmax, self.raw_limit)
        out = head + self.center_array().astype("<f4").tobytes() + self.step_array().astype("<f4").tobytes() + np.asarray(self.freqs, dtype="<u2").tobytes()
        if self.class_freqs or self.position_shift or self.prediction is not None:
            out += _CLASS_COUNT.pack(len(self.class_freqs))
        if self.class_freqs:
            out += np.asarray(self.channel_class, dtype=np.uint8).tobytes() + np.asarray(self.class_freqs, dtype="<u2").tobytes()
        if self.position_shift or self.prediction is not None:
            out += _BAND_COUNT.pack(len(self.position_shift)) + bytes(self.position_shift)
        if self.prediction is not None:
            out += self.prediction.canonical_bytes() + bytes([len(self.token_shift)])
            out += b"".join(_TOKEN_SHIFT.pack(i, v) for i, v in self.token_shift)
        return out

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of :meth:`canonical_bytes`; every v2 frame's CRC starts from it."""
        return self._digest.hex()

    @property
    def crc_seed(self) -> int:
        """CRC-32 of the 32-byte digest: a v2 frame's CRC continues from it, so a frame checks only
        against the config it was encoded with (no tag field: 4 bytes less per frame)."""
        return self._crc_seed

    @property
    def digest(self) -> bytes:
        """The 32-byte SHA-256 digest of :meth:`canonical_bytes` (``fingerprint`` in bytes)."""
        return self._digest

    @classmethod
    def from_canonical_bytes(cls, data: bytes | bytearray | memoryview, *, max_d: int = MAX_D) -> "CodecConfigV2":
        """Parse :meth:`canonical_bytes` (how a session OPEN carries the config); ValueError on
        anything malformed. ``d`` is checked against ``max_d`` before the arrays are read."""
        buf = bytes(data)
        if len(buf) < _CANON_HEAD.size:
            raise ValueError(f"codec config bytes truncated: {len(buf)} bytes, the header needs {_CANON_HEAD.size}")
        version, d, kmax, raw_limit = _CANON_HEAD.unpack_from(buf)
        if version not in CONFIG_VERSIONS:
            raise ValueError(f"codec config version must be one of {CONFIG_VERSIONS}, got {version}")
        if not 1 <= d <= max_d or not 1 <= kmax <= MAX_KMAX:
            raise ValueError(f"codec config has d = {d} (allowed 1..{max_d}) and kmax = {kmax} (allowed 1..{MAX_KMAX})")
        n = 2 * kmax + 2
        at = _CANON_HEAD.size + 8 * d + 2 * n
        k, bands = 0, 0
        if version != CONFIG_VERSION:
            if len(buf) < at + _CLASS_COUNT.size:
                raise ValueError(f"codec config bytes truncated: {len(buf)} bytes, the class count ends at {at + _CLASS_COUNT.size}")
            (k,) = _CLASS_COUNT.unpack_from(buf, at)
            at += _CLASS_COUNT.size
            least = 1 if version == CONFIG_VERSION_CLASSES else 0
            if not least <= k <= rans.MAX_CLASSES:
                raise ValueError(f"codec config has {k} channel classes (allowed {least}..{rans.MAX_CLASSES})")
        class_at = at
        if k:
            at += d + 2 * n * k
        if version >= CONFIG_VERSION_POSITIONS:
            if len(buf) < at + _BAND_COUNT.size:
                raise ValueError(f"codec config bytes truncated: {len(buf)} bytes, the band count ends at {at + _BAND_COUNT.size}")
            (bands,) = _BAND_COUNT.unpack_from(buf, at)
            at += _BAND_COUNT.size
            least = 1 if version == CONFIG_VERSION_POSITIONS else 0
            if not least <= bands <= MAX_POSITION_BANDS:
                raise ValueError(f"codec config has {bands} position bands (allowed {least}..{MAX_POSITION_BANDS})")
        tail, pairs = 0, ()
        if version == CONFIG_VERSION_PREDICTION:
            tail = EmbeddingPrediction.size_of(d)
            if len(buf) < at + bands + tail + 1:
                raise ValueError(f"codec config bytes truncated: {len(buf)} bytes, the token shift count ends at "
                                 f"{at + bands + tail + 1}")
            count = buf[at + bands + tail]
            pairs = tuple(_TOKEN_SHIFT.unpack_from(buf, at + bands + tail + 1 + _TOKEN_SHIFT.size * j)
                          for j in range(count) if len(buf) >= at + bands + tail + 1 + _TOKEN_SHIFT.size * (j + 1))
            tail += 1 + _TOKEN_SHIFT.size * count
        if len(buf) != at + bands + tail:
            raise ValueError(f"codec config bytes for d = {d}, kmax = {kmax}, {k} classes, {bands} position bands"
                             f"{', a prediction' if tail else ''} must be {at + bands + tail} bytes, got {len(buf)}")
        head = _CANON_HEAD.size
        center = np.frombuffer(buf, dtype="<f4", count=d, offset=head)
        step = np.frombuffer(buf, dtype="<f4", count=d, offset=head + 4 * d)
        freqs = np.frombuffer(buf, dtype="<u2", count=n, offset=head + 8 * d)
        classes, tables = (), ()
        if k:
            classes = tuple(np.frombuffer(buf, dtype=np.uint8, count=d, offset=class_at).tolist())
            flat = np.frombuffer(buf, dtype="<u2", count=n * k, offset=class_at + d)
            tables = tuple(tuple(row) for row in flat.reshape(k, n).tolist())
        prediction = EmbeddingPrediction.from_canonical_bytes(buf[at + bands :], d) if tail else None
        return cls(center=tuple(center.tolist()), step=tuple(step.tolist()), kmax=int(kmax),
                   freqs=tuple(int(f) for f in freqs), raw_limit=int(raw_limit), class_freqs=tables, channel_class=classes,
                   position_shift=tuple(buf[at : at + bands]), prediction=prediction, token_shift=pairs)

    def to_dict(self) -> dict:
        if self.frame_scale:
            raise ValueError(f"a frame view (scale {self.frame_scale}) is not a session config: serialise its base")
        out = {"version": self.version, "center": list(self.center), "step": list(self.step), "kmax": self.kmax, "freqs": list(self.freqs),
               "raw_limit": self.raw_limit, "info": dict(self.info), "fingerprint": self.fingerprint}
        if self.class_freqs:
            out["class_freqs"] = [list(t) for t in self.class_freqs]
            out["channel_class"] = list(self.channel_class)
        if self.position_shift:
            out["position_shift"] = list(self.position_shift)
        if self.prediction is not None:
            out["prediction"] = self.prediction.to_dict()
        if self.token_shift:
            out["token_shift"] = [list(p) for p in self.token_shift]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "CodecConfigV2":
        version = d.get("version")
        if version not in CONFIG_VERSIONS:
            raise ValueError(f"codec config version must be one of {CONFIG_VERSIONS}, got {version!r}")
        if (version == CONFIG_VERSION_CLASSES) != ("class_freqs" in d) and version < CONFIG_VERSION_POSITIONS:
            raise ValueError(f"a version {version} codec config must {'' if version == CONFIG_VERSION_CLASSES else 'not '}have class_freqs")
        if (version == CONFIG_VERSION_POSITIONS) != ("position_shift" in d) and version != CONFIG_VERSION_PREDICTION:
            raise ValueError(f"a version {version} codec config must {'' if version == CONFIG_VERSION_POSITIONS else 'not '}have position_shift")
        if (version == CONFIG_VERSION_PREDICTION) != ("prediction" in d):
            raise ValueError(f"a version {version} codec config must {'' if version == CONFIG_VERSION_PREDICTION else 'not '}have prediction")
        prediction = EmbeddingPrediction.from_dict(d["prediction"]) if "prediction" in d else None
        cfg = cls(center=tuple(d["center"]), step=tuple(d["step"]), kmax=d["kmax"], freqs=tuple(d["freqs"]), raw_limit=d["raw_limit"],
                  class_freqs=tuple(tuple(t) for t in d.get("class_freqs", ())), channel_class=tuple(d.get("channel_class", ())),
                  position_shift=tuple(d.get("position_shift", ())), prediction=prediction,
                  token_shift=tuple(tuple(p) for p in d.get("token_shift", ())), info=dict(d.get("info", {})))
        if "fingerprint" in d and d["fingerprint"] != cfg.fingerprint:
            raise ValueError("codec config fingerprint does not match its contents")
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "CodecConfigV2":
        return cls.from_dict(json.loads(text))
