"""Per-frame rate control of codec v2 (docs/FORMATS.md §5.4.3): the edge picks each frame's step
scale so that frames cost a target of bits per element on whatever text a session sends.

Why: ``calibrate`` fixes the step on calibration text, but the bits a step costs depend on the
text. On the GPL-3 licence text Qwen2.5-Coder-0.5B split 18 cost 0.34 bit per element more than on
the calibration windows (4.59 bits in one-token frames, over the 4.5 goal), while SmolLM2-135M
split 10 left bits unspent on the same text (bench/results/codec_v2/README.md, session 23). A
static rule has to leave a margin for the worst text; a controller measures the session's own
frames and moves the step by quarter octaves instead.

The rule (deterministic: the same hidden states give the same frames):

* ``level``: the session's estimated bits per element of a frame's symbols and values at scale 0,
  framing and the residuals of early positions (§5.2) left out. After each frame the measured
  bits plus ``SLOPE`` per scale step is blended in with weight ``1 - exp(-T / MEMORY_TOKENS)`` (a
  512-token prefill frame replaces it; a one-token frame moves it 3%).
* Decode frames (fewer than ``SEARCH_MIN_TOKENS`` tokens: one token, or a few speculative ones)
  take the wanted scale ``(level + framing - target) / SLOPE``, rounded, plus what pays back the
  ``debt`` (the bits they spent beyond the target so far) over ``REPAY_TOKENS`` tokens: an
  integral control, so the session's decode frames average the target. A frame with rows at early
  positions (finer steps, a residual section) is never coded coarser than calibrated: those
  tokens weigh most on every later one (Gemma 3 270M split 2 on the GPL-3 text: one-token frames
  at KL 0.011 when the controller coarsened them to pay for their own residuals, 0.0025 when later
  frames pay); later frames pay.
* A prefill frame is encoded at the rounded-up wanted scale, then at the scale its own bits ask
  for, at most ``LONG_TRIES`` times in all, and the finest one within the target is sent.
* The scale stays within ``[finest, MAX_FRAME_SCALE]``: ``finest`` (<= 0, from ``calibrate``) is
  the step the KL target asks for, so the controller spends unused bits on quality only down to
  that step, and a split whose KL target is cheaper than the target never goes finer than its
  calibrated step.

The equilibrium does not depend on ``SLOPE`` (only the speed of getting there does): the scale
stops moving where the measured bits equal the target.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..ops.checks import FLOAT_DTYPES, check_tensor
from .config_v2 import MAX_FRAME_SCALE, CodecConfigV2
from .frame_v2 import framing_bytes, rans_coder, rans_stream_lanes, residual_bytes
from .wire_v2 import encode_frame_v2

RATE_BITS = 4.4  # default target (the goal is 4.5 bits per element of every frame, framing counted)
SLOPE = 0.25  # bits per element one quarter-octave scale step saves (about 1 bit per octave at 4 bits)
MEMORY_TOKENS = 32.0  # the level follows the text over about this many tokens
REPAY_TOKENS = 128.0  # decode frames pay back bits spent beyond the target over about this many tokens
LONG_TRIES = 3  # encodes a long frame may take to meet the target ...
SEARCH_MIN_TOKENS = 64  # ... when it has this many tokens (shorter ones: one encode, as decode steps)


@dataclass(frozen=True)
class RatePolicy:
    """Target ``bits`` per element of every frame (framing counted) and the finest scale
    (``finest`` <= 0) the controller may use."""

    bits: float = RATE_BITS
    finest: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.bits, (int, float)) and math.isfinite(self.bits) and 0 < self.bits <= 64):
            raise ValueError(f"rate bits must be a number in (0, 64], got {self.bits!r}")
        if isinstance(self.finest, bool) or not isinstance(self.finest, int) or not -MAX_FRAME_SCALE <= self.finest <= 0:
            raise ValueError(f"finest scale must be an int in [-{MAX_FRAME_SCALE}, 0], got {self.finest!r}")

    def to_dict(self) -> dict:
        return {"bits": float(self.bits), "finest": self.finest}

    @classmethod
    def from_dict(cls, d: dict) -> "RatePolicy":
        """The policy of :meth:`to_dict`'s form; ValueError naming what is wrong (a hand-edited plan)."""
        if not isinstance(d, dict) or set(d) != {"bits", "finest"}:
            raise ValueError(f"a rate policy must be {{'bits': number, 'finest': int}}, got {d!r}")
        return cls(d["bits"], d["finest"])


def policy_of(config: CodecConfigV2) -> RatePolicy | None:
    """The rate policy ``calibrate`` stored in the config's notes (``info["rate"]``), or None
    (frames then keep the calibrated step)."""
    entry = config.info.get("rate")
    return None if entry is None else RatePolicy.from_dict(entry)


def framing_bits(t: int, d: int) -> float:
    """Bits per element of a frame of ``t`` tokens that are framing: header or tag, scale byte,
    escape count, bitmap, CRC and the rANS states (what the level leaves out)."""
    lanes = rans_stream_lanes(rans_coder(t, d), t * d)
    return 8.0 * (framing_bytes(t, escapes=0) + 1 + 4 * lanes) / (t * d)


def expected_bits(bits_at_step: float, policy: RatePolicy) -> float:
    """Bits per element a session's frames settle at under ``policy`` when they cost
    ``bits_at_step`` at the calibrated step: the target where that is dearer, else the calibrated
    cost plus what the finer scales down to ``policy.finest`` add (about ``SLOPE`` each), at most the target."""
    if bits_at_step >= policy.bits:
        return policy.bits
    return min(policy.bits, bits_at_step - SLOPE * policy.finest)


def _valid(config: CodecConfigV2, scale: int) -> bool:
    try:
        config.scaled(scale)
    except ValueError:
        return False
    return True


class RateControl:
    """Encodes one session's frames (in order) at the step scale that meets ``policy.bits``.

    ``encode_frame`` takes what :func:`splitkernels.codec.encode_frame` takes and returns the frame
    bytes; :attr:`scales` records every frame's scale (for reports)."""

    def __init__(self, config: CodecConfigV2, policy: RatePolicy) -> None:
        if not isinstance(config, CodecConfigV2) or config.frame_scale:
            raise TypeError("rate control needs a session CodecConfigV2 (not a frame view)")
        self.config, self.policy = config, policy
        # The scales whose steps are valid for this config (a view fails only at extreme steps).
        self._lo = next(g for g in range(policy.finest, 1) if _valid(config, g))
        self._hi = next(g for g in range(MAX_FRAME_SCALE, -1, -1) if _valid(config, g))
        self.level: float | None = None
        self.debt = 0.0  # decode frames' bits beyond the target so far, in bit-elements
        self.scales: list[int] = []

    def _clamp(self, scale: int) -> int:
        return max(self._lo, min(self._hi, scale))

    def _residual_bits(self, t: int, d: int, start: int, tokens) -> float:
        """Bits per element of the frame's residual section (its rows at early positions; §5.2)."""
        shifts = self.config.row_shifts(start, t, tokens)
        return 8.0 * residual_bytes(shifts, np.zeros(len(shifts), dtype=bool), d) / (t * d) if len(shifts) else 0.0

    def _wanted(self, t: int, d: int) -> float:
        return (self.level + framing_bits(t, d) - self.policy.bits) / SLOPE

    def _learn(self, bits: float, t: int, scale: int) -> None:
        sample = bits + SLOPE * scale
        weight = 1.0 - math.exp(-t / MEMORY_TOKENS)
        self.level = sample if self.level is None else self.level + weight * (sample - self.level)

    def _long_frame(self, at, t: int, d: int, extra: float) -> tuple[int, bytes]:
        """The finest scale (and its frame) within ``LONG_TRIES`` encodes that meets the target,
        starting from the level's guess (scale 0 before any frame); the coarsest tried when none does."""
        scale = 0 if self.level is None else self._clamp(math.ceil(self._wanted(t, d) + extra / SLOPE - 1e-9))
        tried: dict[int, bytes] = {}
        for _ in range(LONG_TRIES):
            frame = tried[scale] = at(scale)
            gap = (self.policy.bits - 8.0 * len(frame) / (t * d)) / SLOPE  # > 0: bits to spare
            nxt = self._clamp(scale - math.floor(gap) if gap >= 0 else scale + math.ceil(-gap))
            if nxt in tried:
                break
            scale = nxt
        fits = [g for g, f in tried.items() if 8.0 * len(f) <= self.policy.bits * t * d]
        scale = min(fits) if fits else max(tried)
        return scale, tried[scale]

    def encode_frame(self, x: torch.Tensor, coder: str | None = None, start: int = 0, tokens=None,
                     embedding: torch.Tensor | None = None, wire_dtype: torch.dtype | None = None) -> bytes:
        """The frame of ``x [T, d]`` (in ``wire_dtype``, as :func:`~splitkernels.codec.wire_v2.encode_frame_v2`)
        at the scale the session's measurements ask for (see the module)."""
        check_tensor("x", x, FLOAT_DTYPES, ndim=2)
        t, d = int(x.shape[0]), int(x.shape[1])
        if t == 0:
            raise ValueError("x must hold at least one token")
        extra = self._residual_bits(t, d, start, tokens)

        def at(scale: int) -> bytes:
            return encode_frame_v2(x, self.config.scaled(scale), coder, start, tokens, embedding, wire_dtype)

        if t < SEARCH_MIN_TOKENS:
            scale = 0
            if self.level is not None:
                scale = self._clamp(round(self._wanted(t, d) + self.debt / (REPAY_TOKENS * d * SLOPE)))
                if extra:  # early positions: never coarser than calibrated, later frames pay
                    scale = min(scale, 0)  # scale 0 is always valid (_lo <= 0)
            frame = at(scale)
            self.debt += 8.0 * len(frame) - self.policy.bits * t * d
        else:
            scale, frame = self._long_frame(at, t, d, extra)
        self._learn(8.0 * len(frame) / (t * d) - framing_bits(t, d) - extra, t, scale)
        self.scales.append(scale)
        return frame


def rate_control(config, policy: RatePolicy | None = None) -> RateControl | None:
    """A :class:`RateControl` for a session coding with ``config``: ``policy``, else the one
    ``calibrate`` stored in the config; None for a v1 config or a v2 config without a policy."""
    if not isinstance(config, CodecConfigV2):
        return None
    policy = policy or policy_of(config)
    return None if policy is None else RateControl(config, policy)


def session_encoder(codec, rated: bool = True, wire_dtype: torch.dtype | None = None) -> Callable[..., bytes]:
    """What an edge session encodes its frames with, in order: ``(x, coder, start, tokens,
    embedding) -> bytes`` of ``x`` in ``wire_dtype`` (None: as it comes), through a
    :class:`RateControl` when ``rated`` and the v2 config carries a rate policy, else
    :func:`splitkernels.codec.encode_frame` as it is."""
    rate = rate_control(codec) if rated else None
    if rate is not None:
        return functools.partial(rate.encode_frame, wire_dtype=wire_dtype)
    from .dispatch import encode_frame  # the codec package's entry point (imports this module's users)

    def plain(x: torch.Tensor, coder: str | None = None, start: int = 0, tokens=None,
              embedding: torch.Tensor | None = None) -> bytes:
        return encode_frame(x, codec, coder, start=start, tokens=tokens, embedding=embedding, wire_dtype=wire_dtype)
    return plain
