"""Fit a codec v2 configuration from split-layer hidden states (DESIGN §1, codec v2).

What is fitted, from calibration hidden states ``[N, d]`` of one model and split layer:

* **Channel centers.** The per-channel median of the calibration tokens is subtracted first, so a
  channel with a large constant part (a massive activation) codes only its variation.
* **Channel scales.** With a measured ``sensitivity`` (diagonal Fisher of the model's output with
  respect to the split hidden state, :func:`splitkernels.codec.sensitivity.fisher_diagonal`), the
  scale of channel ``c`` is ``F_c ** -0.5``: quantisation noise ``scale_c**2 * step**2 / 12`` then
  costs the same KL in every channel, which minimises the second-order KL estimate
  ``0.5 * sum_c F_c * noise_c`` at a given entropy-coded rate. Without one, every channel gets the
  same scale (equal absolute noise, as v1 gives its inliers). Scales are clipped to
  ``[1/64, 64]`` of their median so a few badly estimated channels cannot take all the bits.
* **Sinks.** Tokens whose rms is above ``SINK_RATIO`` times the median token rms (the position-0
  attention sink, for example) are left out of every statistic; at encode time their extreme
  values escape (exact) and a token with more than ``raw_limit`` escapes travels raw.
* **Global step and alphabet.** One step ``delta`` in the equalised domain, found by bisection so
  that the estimated bits per element of 512-token frames (static-table entropy of the symbols,
  escapes at the wire dtype, raw tokens, framing) meets ``bits``, and/or the KL proxy meets
  ``max_kl_proxy``. With a measured sensitivity and no target, the default aims at the KL
  proxy ``DEFAULT_KL_PROXY`` within a ceiling that keeps one-token decode frames at about
  ``DECODE_FRAME_BITS`` bits per element (:func:`default_bits_ceiling`): each split layer gets the
  rate its own sensitivity asks for (measured KL / proxy: 0.95-1.17 on SmolLM2 and Gemma 3,
  2.1-2.5 at Gemma 3 split 2 before its token prediction), instead of one rate for all; at the
  default target most splits of both models reach the ceiling. The default rule also stores a
  rate policy (``info["rate"]``, :mod:`.rate`): the edge's frames then meet ``RATE_BITS`` on any
  text by a per-frame step scale, going finer than the calibrated step down to the KL target's
  where the text leaves bits. ``kmax`` covers all but ``ESCAPE_RATE`` of the calibration values; everything
  beyond escapes exact, so massive channels and heavy outliers are never clipped.
* **Position shifts.** With a measured ``position_sensitivity`` (the Fisher trace per position of
  the calibration windows), each position band (position 0, then ``[2**(b-1), 2**b)``) gets the
  step of the late positions divided by ``2**shift``, ``shift = rint(0.5 * log2(F_band / F_late))``
  (noise costs ``F * step**2``, so that equalises the KL per token, as the channel scales do per
  channel). Early tokens are read by every later token through attention: on Gemma 3 270M split 2
  positions 1-7 weigh 90-440x a late one, and these shifts cut the measured KL from 0.0060 to 0.0034 at the same
  bits of 512-token frames. One-token decode frames (late positions) pay nothing for them. Every
  band below position 32 gets at least the largest shift of bands 1-5 (:data:`SINK_BANDS`) when
  that shift is 3 or more (:data:`SINK_FLOOR_MIN`): a
  window that does not start with a sink token makes some of its first content tokens sinks, and
  which ones depends on the text. That floor costs its bits, but the late step is set as without
  it (an insurance, not a measured gain).
* **Token prediction.** Given the calibration tokens' ids and the model's input ``embedding``
  table, a per-channel gain fitted by least squares predicts each hidden state from its token's
  embedding row; the codec then codes the residual and frames carry the ids (docs/FORMATS.md
  §5.2.1). It is kept only when it saves at least :data:`PREDICTION_MIN_SAVING` bit per element
  at the same step (ids and fp32 escapes counted): on Gemma 3 270M, whose embeddings are scaled by
  ``sqrt(d)``, 0.35 bit at split 2 and nothing from split 4 on; nothing on SmolLM2.
* **Token shifts.** With a prediction the frames carry token ids, so a step can depend on the
  token: given the per-token Fisher trace (``token_sensitivity``), an id whose occurrences at
  positions 1-127 (below :data:`~.config_v2.TOKEN_SHIFT_END`) weigh on average ``r`` late tokens
  gets ``shift = rint(0.5 * log2(r)) + 1`` there when ``rint(0.5 * log2(r))`` is at least 2 (and
  it occurs at least 3 times); where the position shifts give as much, it costs nothing. Why: in
  a window without a BOS the model makes some newlines attention sinks, and which ones depends on
  the text, and noise on a forming sink costs more than its Fisher weight says: on Gemma 3 270M
  split 2, a reStructuredText window without BOS had KL 0.0122 with the position shifts alone,
  0.0120 with the measured token shifts (newline: 2) and 0.0030 with one more.
* **rANS tables** from the symbol counts at the chosen step: one pooled table, and ``classes``
  tables for groups of channels of alike spread (channels sorted by their mean code magnitude,
  cut into equal groups), so a channel that is nearly always 0 does not pay for the tails of a
  busy one. Measured on Gemma 3 270M split 2, out of sample: 0.09 (4 classes) to 0.11 bit (16)
  per element below one table; per-channel tables overfit 1024 calibration tokens.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import rans
from .config_v2 import (MAX_FRAME_SCALE, MAX_KMAX, MAX_POSITION_BANDS, MAX_SHIFT, MAX_TOKEN_SHIFTS, TOKEN_SHIFT_END, CodecConfigV2,
                        band_shifts, position_band)
from .frame_v2 import framing_bytes, rans_coder, rans_stream_lanes
from .predict import EmbeddingPrediction, fit_gain, table_digest
from .rate import RATE_BITS, RatePolicy

DEFAULT_BITS = 4.0  # without a measured sensitivity
# Scored text the calibration did not see runs at up to 2.5x the KL measured on the calibration
# windows: Gemma 3 270M split 2 on Python source 2.2x (session 11), Qwen2.5-Coder-0.5B on the GPL-3
# text 2.0-2.5x at 0.0020, KL 0.0049-0.0064 and perplexity +1.15-1.24% (session 23;
# bench/results/codec_v2/README.md). Splits below the ceiling spend bits down to this target; most
# splits of SmolLM2 and Gemma 3 reach the ceiling first.
DEFAULT_KL_PROXY = 0.0010
# 0.25 bit under the goal: scored text the calibration did not see has heavier tails, and a split at
# the ceiling landed up to 0.21 bit above it in one-token frames of source code (SmolLM2-135M split 10,
# Gemma 3 270M split 6; bench/results/codec_v2/README.md, session 11), and 0.34 above it (4.59 bits,
# over the goal) on the GPL-3 text (Qwen2.5-Coder split 18, session 23). With the rate policy the
# default rule stores (rate.py) this is where a session's frames start and what frames cost without
# rate control; the controller then holds them at RATE_BITS on whatever text it sends.
DECODE_FRAME_BITS = 4.25
SINK_RATIO = 8.0
SCALE_CLIP = 64.0
ESCAPE_RATE = 1e-4
FRAME_TOKENS = 512
RAW_FRACTION = 0.5
DEFAULT_CLASSES = 16
MIN_CLASS_CHANNELS = 16  # fewer channels per class than this: fewer classes
_BISECT_STEPS = 30
MIN_PROFILE_POSITIONS = 16  # a shorter position profile sets no position shifts
SINK_BANDS = 6  # positions below 2**(SINK_BANDS - 1) = 32 share the largest of their shifts ...
SINK_FLOOR_MIN = 3  # ... when that shift is at least this
# A prediction must save this much (bits per element of 512-token frames at the same step, its ids
# counted) to be used: below it, the estimate's own error on unseen text.
PREDICTION_MIN_SAVING = 0.05
CEILING = "ceiling"  # calibrate(bits=CEILING): the decode-frame ceiling, ids counted when the config predicts
TOKEN_SHIFT_MIN = 2  # token shifts are kept where the measured weight asks for this shift ...
TOKEN_SHIFT_OCCURRENCES = 3  # ... for ids seen at least this often at positions 1-127 ...
TOKEN_SHIFT_MARGIN = 1  # ... and set this much finer than it asks


def _token_rms(x: torch.Tensor) -> torch.Tensor:
    return x.double().pow(2).mean(1).sqrt()


def sink_mask(hidden: torch.Tensor) -> torch.Tensor:
    """Tokens whose rms exceeds ``SINK_RATIO`` x the median token rms (attention sinks)."""
    r = _token_rms(hidden)
    return r > SINK_RATIO * r.median()


def channel_scales(hidden: torch.Tensor, sensitivity: torch.Tensor | None) -> np.ndarray:
    """Relative per-channel scales (median 1): ``F ** -0.5`` clipped, or all ones without ``F``."""
    d = hidden.shape[1]
    if sensitivity is None:
        return np.ones(d, dtype=np.float64)
    f = sensitivity.detach().double().cpu().numpy()
    if f.shape != (d,) or not np.isfinite(f).all() or (f < 0).any():
        raise ValueError(f"sensitivity must be a finite non-negative tensor of shape [{d}]")
    med = np.median(f)
    if not med > 0:
        raise ValueError("sensitivity is zero for more than half the channels; it carries no usable measurement")
    s = np.sqrt(med / np.maximum(f, med / SCALE_CLIP**2))
    return np.clip(s, 1.0 / SCALE_CLIP, SCALE_CLIP)


class _Stats:
    """Calibration values in the equalised domain and what each step setting costs there."""

    def __init__(self, hidden: torch.Tensor, center: np.ndarray, scales: np.ndarray, value_bits: int,
                 sensitivity: torch.Tensor | None, classes: int, id_bits: int = 0) -> None:
        self.classes = classes
        self.z = (hidden.float() - torch.from_numpy(center)) / torch.from_numpy(scales).float()
        self.scales = torch.from_numpy(scales).float()
        self.d = hidden.shape[1]
        self.value_bits = value_bits
        self.fisher = None if sensitivity is None else sensitivity.detach().double().cpu()
        self.framing = long_frame_framing_bits(self.d, id_bits)
        flat = self.z.abs().flatten()
        sample = flat if flat.numel() <= 1 << 24 else flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 24]]
        self.z_hi = float(torch.quantile(sample, 1.0 - ESCAPE_RATE))

    def kmax(self, delta: float) -> int:
        return int(min(MAX_KMAX, max(1, math.ceil(self.z_hi / delta))))

    def symbols(self, delta: float) -> tuple[torch.Tensor, int]:
        k = self.kmax(delta)
        v = self.z / delta
        esc = v.abs() > k
        return torch.where(esc, torch.full_like(v, 2 * k + 1), torch.round(v.clamp(-k, k)) + k), k

    def table(self, delta: float) -> tuple[tuple[int, ...], int, float, tuple, tuple]:
        """(pooled freqs, kmax, estimated bits per element at ``delta`` for 512-token frames, class
        tables, channel classes); no class tables when ``classes`` < 2."""
        sym, k = self.symbols(delta)
        n_sym = 2 * k + 2
        per_channel = torch.zeros(self.d, n_sym, dtype=torch.float64)
        per_channel.scatter_add_(1, sym.long().T.contiguous(), torch.ones(self.d, sym.shape[0], dtype=torch.float64))
        per_channel = per_channel.numpy()
        counts = per_channel.sum(0)
        freqs = rans.build_freqs(counts)
        tables, table_of = (), ()
        if self.classes >= 2:
            magnitude = np.abs(np.arange(n_sym) - k).astype(np.float64)
            magnitude[-1] = k + 1  # the escape
            spread = per_channel @ magnitude
            rank = np.empty(self.d, dtype=np.int64)
            rank[np.argsort(spread, kind="stable")] = np.arange(self.d)
            table_of = tuple((rank * self.classes // self.d).tolist())
            groups = np.zeros((self.classes, n_sym))
            np.add.at(groups, np.asarray(table_of), per_channel)
            tables = tuple(rans.build_freqs(g) for g in groups)
            coded = sum(float((g * -np.log2(np.asarray(t, dtype=np.float64) / rans.M)).sum()) for g, t in zip(groups, tables))
        else:
            coded = float((counts * -np.log2(np.asarray(freqs, dtype=np.float64) / rans.M)).sum())
        n = counts.sum()
        bits = coded / n + float(counts[2 * k + 1] / n * self.value_bits) + self.framing
        return freqs, k, bits, tables, table_of

    def kl_proxy(self, delta: float) -> float:
        """``0.5 * sum_c F_c * mean_t err_tc**2`` of the quantisation error (escapes are exact)."""
        if self.fisher is None:
            raise ValueError("max_kl_proxy needs a measured sensitivity (diagonal Fisher) of the split hidden state")
        k = self.kmax(delta)
        v = self.z / delta
        err = torch.where(v.abs() > k, torch.zeros_like(v), (torch.round(v.clamp(-k, k)) - v) * delta) * self.scales
        return 0.5 * float((err.double().pow(2).mean(0) * self.fisher).sum())


def position_shifts(profile: torch.Tensor, *, sink_floor: bool = True) -> tuple[int, ...]:
    """Position shifts (``CodecConfigV2.position_shift``) from the mean Fisher trace per position
    ``profile [P]`` of calibration windows: band ``b`` gets ``rint(0.5 * log2(mean over the band /
    mean over positions [P/2, P)))`` in ``[0, MAX_SHIFT]``, with ``sink_floor`` raised to the
    largest of bands 1 .. SINK_BANDS - 1 for every band below :data:`SINK_BANDS` when that is at
    least :data:`SINK_FLOOR_MIN`; bands beyond ``P`` get 0."""
    a = profile.detach().double().cpu()
    if a.dim() != 1 or not torch.isfinite(a).all() or (a < 0).any():
        raise ValueError(f"position_sensitivity must be a finite non-negative 1-D tensor, got shape {tuple(a.shape)}")
    p = a.shape[0]
    late = float(a[p // 2 :].mean()) if p else 0.0
    if p < MIN_PROFILE_POSITIONS or not late > 0:
        return ()
    shifts = []
    for band in range(min(MAX_POSITION_BANDS, position_band(p - 1) + 1)):
        lo, hi = (0, 1) if band == 0 else (1 << (band - 1), min(p, 1 << band))
        ratio = float(a[lo:hi].mean()) / late
        shifts.append(int(min(MAX_SHIFT, max(0, round(0.5 * math.log2(ratio))))) if ratio > 0 else 0)
    # Which early token turns into an attention sink depends on the text: a window that does not
    # start with a sink token (BOS) makes some of its first newlines or brackets sinks, whose Fisher
    # is 1000x a late token's (Gemma 3 270M split 2 on Python source: KL 0.023 in such a window, 0.0066
    # with positions below 32 exact). Calibration text shows such sinks at some early positions but
    # not at all, so every band below SINK_BANDS gets at least the largest shift of bands 1 .. SINK_BANDS - 1.
    # Only where early tokens weigh 4**SINK_FLOOR_MIN = 64 late ones or more: below that, one
    # unprotected sink costs little KL, and the floor's bits (up to 32 shifted tokens) weigh on
    # short prompts (SmolLM2's 42-token demo prompt: 4.10 -> 4.63 bits per element with floor 1).
    floor = max(shifts[1:SINK_BANDS], default=0)  # position 0 is the usual sink (and often sent raw)
    if sink_floor and floor >= SINK_FLOOR_MIN:
        shifts[:SINK_BANDS] = [max(s, floor) for s in shifts[:SINK_BANDS]]
    while shifts and shifts[-1] == 0:
        shifts.pop()
    return tuple(shifts)


def token_shifts(tokens: torch.Tensor, trace: torch.Tensor, profile: torch.Tensor,
                 position_shift: tuple[int, ...]) -> tuple[tuple[tuple[int, int], ...], float]:
    """(``CodecConfigV2.token_shift``, the residual bits per element they add to frames like the
    calibration windows) from the ids ``tokens [N]`` of windows of ``P = len(profile)`` positions,
    their per-token Fisher ``trace [N]`` and the position profile (module docstring)."""
    p = profile.shape[0]
    late = float(profile.detach().double()[p // 2 :].mean())
    if p < MIN_PROFILE_POSITIONS or not late > 0:
        return (), 0.0
    ids = tokens.detach().cpu().reshape(-1).to(torch.int64)
    trace = trace.detach().cpu().double().reshape(-1)
    pos = torch.arange(ids.shape[0]) % p
    band = (pos >= 1) & (pos < TOKEN_SHIFT_END)
    found = []
    for i in ids[band].unique().tolist():
        sel = band & (ids == i)
        n = int(sel.sum())
        ratio = float(trace[sel].mean()) / late
        if n >= TOKEN_SHIFT_OCCURRENCES and ratio > 0:
            shift = int(min(MAX_SHIFT, max(0, round(0.5 * math.log2(ratio)))))
            if shift >= TOKEN_SHIFT_MIN:
                found.append((ratio, i, min(MAX_SHIFT, shift + TOKEN_SHIFT_MARGIN)))
    pairs = tuple(sorted((i, shift) for _, i, shift in sorted(found, reverse=True)[:MAX_TOKEN_SHIFTS]))
    if not pairs:
        return (), 0.0
    table = dict(pairs)
    early = pos < TOKEN_SHIFT_END
    given = torch.from_numpy(band_shifts(position_shift, 0, TOKEN_SHIFT_END))[pos[early]]
    extra = torch.tensor([table.get(i, 0) for i in ids[early].tolist()], dtype=torch.int64) - given
    return pairs, float(extra.clamp_min(0).sum()) / ids.shape[0]


def _shift_costs(shifts: tuple[int, ...], profile: torch.Tensor | None, sink_first: bool) -> tuple[float, float]:
    """(extra bits per element of a 512-token frame from position 0 for the residuals, factor on
    the KL proxy: the Fisher-weighted mean of ``4**-shift`` over positions >= 1 of the profile)."""
    if not shifts:
        return 0.0, 1.0
    first = 1 if sink_first else 0
    extra = float(band_shifts(shifts, first, FRAME_TOKENS - first).sum()) / FRAME_TOKENS
    a = profile.detach().double().cpu()[1:]
    weights = torch.from_numpy(4.0 ** -band_shifts(shifts, 1, a.shape[0]).astype(np.float64))
    return extra, float((a * weights).sum() / a.sum()) if float(a.sum()) > 0 else 1.0


def default_bits_ceiling(d: int, id_bits: int = 0) -> float:
    """Bits per element of 512-token frames (as :func:`calibrate` estimates them) that leave a
    one-token frame of ``d`` values, whose tag, escape count, CRC and rANS states weigh ``8 * 10 / d`` bits per
    element (``8 * 22 / d`` from the four-lane layout's 2048 values; plus its token id at ``id_bits``
    with a prediction), at about ``DECODE_FRAME_BITS``; never below ``DEFAULT_BITS``."""
    one_token = 8.0 * (framing_bytes(1, 0, id_bits=id_bits) + 4 * rans_stream_lanes(rans_coder(1, d), d)) / d
    return max(DEFAULT_BITS, DECODE_FRAME_BITS - one_token + long_frame_framing_bits(d, id_bits))


def long_frame_framing_bits(d: int, id_bits: int = 0) -> float:
    """Bits per element that the framing of a ``FRAME_TOKENS``-token frame of ``d`` values weighs
    (header, 3 bytes of counts, the rANS states of the layout the writer picks: 32 lanes from
    2^16 values), the part of a long frame's bits that calibration's rate does not set."""
    coded = FRAME_TOKENS * d
    states = 4 * rans_stream_lanes(rans_coder(FRAME_TOKENS, d), coded)
    return 8.0 * (framing_bytes(FRAME_TOKENS, id_bits=id_bits) + 3 + states) / coded


def _bisect(pred, lo: float, hi: float) -> tuple[float, float]:
    """Bracket ``(a, b)`` on a log scale with pred(a) true and pred(b) false (pred true for small
    deltas); ``(lo, lo)`` if pred(lo) is false, ``(hi, hi)`` if pred(hi) is true."""
    if not pred(lo):
        return lo, lo
    if pred(hi):
        return hi, hi
    for _ in range(_BISECT_STEPS):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if pred(mid) else (lo, mid)
    return lo, hi


def _fit_prediction(hidden: torch.Tensor, sinks: torch.Tensor, tokens: torch.Tensor, embedding: torch.Tensor,
                    scales: np.ndarray, value_bits: int, classes: int) -> tuple[EmbeddingPrediction, torch.Tensor, float]:
    """The least-squares prediction of ``hidden`` from its tokens' embedding rows (sinks left
    out), the residual of the tokens that are not sinks, and the bits per element the prediction
    saves at the step that gives the plain codec ``DEFAULT_BITS``."""
    rows = embedding.detach()[tokens.to(embedding.device)].float().cpu()
    pred = EmbeddingPrediction(fit_gain(hidden[~sinks], rows[~sinks]), int(embedding.shape[0]), table_digest(embedding))
    resid = (hidden - pred.values(tokens, embedding, hidden.device))[~sinks]
    body = hidden[~sinks]
    plain = _Stats(body, body.median(0).values.numpy(), scales, value_bits, None, classes)
    fitted = _Stats(resid, resid.median(0).values.numpy(), scales, 32, None, classes, pred.id_bits)
    spread = max(float(plain.z.pow(2).mean().sqrt()), 1e-30)
    delta = _bisect(lambda dl: plain.table(dl)[2] > DEFAULT_BITS, spread * 2.0**-16, spread * 4.0)[1]
    return pred, resid, plain.table(delta)[2] - fitted.table(delta)[2]


def calibrate(
    hidden: torch.Tensor,
    *,
    bits: float | str | None = None,
    max_kl_proxy: float | None = None,
    base: CodecConfigV2 | None = None,
    sensitivity: torch.Tensor | None = None,
    wire_dtype: torch.dtype = torch.float16,
    classes: int = DEFAULT_CLASSES,
    position_sensitivity: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    embedding: torch.Tensor | None = None,
    token_sensitivity: torch.Tensor | None = None,
) -> CodecConfigV2:
    """Fit a :class:`CodecConfigV2` from split-layer hidden states ``[N, d]`` (module docstring).

    ``bits``: target bits per element of 512-token frames (every frame byte counted), or
    :data:`CEILING` for :func:`default_bits_ceiling` (with the ids when the config predicts). When neither
    target is given: with ``sensitivity``, ``max_kl_proxy = DEFAULT_KL_PROXY`` within
    ``bits = default_bits_ceiling(d)``; without, ``bits = DEFAULT_BITS``. ``max_kl_proxy``: target of the second-order KL
    estimate (needs ``sensitivity``); with both, the coarsest step meeting the proxy is used unless
    it costs more than ``bits``. ``base``: keep its relative channel scales and refit the rest.
    ``sensitivity``: diagonal Fisher ``[d]`` of the model output w.r.t. the split hidden state.
    ``wire_dtype``: dtype the edge sends (escape and raw values are charged at its width).
    ``classes``: rANS tables for channel classes (fewer when ``d`` is small: at least
    ``MIN_CLASS_CHANNELS`` channels per class; 1 = one table for every channel).
    ``position_sensitivity``: the Fisher trace per position ``[P]`` of the calibration windows
    (:attr:`splitkernels.codec.sensitivity.Fisher.position`; ``hidden`` is then ``N / P`` such
    windows, each from position 0): sets the position shifts, and ``bits`` then counts their
    residuals in 512-token frames from position 0.
    ``tokens`` (the ids ``[N]`` of ``hidden``'s tokens) and ``embedding`` (the model's input
    embedding table ``[V, d]``): fit a token prediction and keep it where it pays (module docstring).
    ``token_sensitivity``: the Fisher trace of each of ``hidden``'s tokens ``[N]``
    (:attr:`~splitkernels.codec.sensitivity.Fisher.token`): with a kept prediction and
    ``position_sensitivity``, sets the token shifts.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or hidden.shape[0] < 1 or hidden.shape[1] < 1:
        raise ValueError(f"hidden must be a [N, d] tensor with N, d >= 1, got {getattr(hidden, 'shape', type(hidden))}")
    if not hidden.is_floating_point() or not torch.isfinite(hidden).all():
        raise ValueError("hidden must be a finite floating-point tensor")
    if bits is not None and bits != CEILING and not (isinstance(bits, (int, float)) and 1.0 <= bits <= 16.0):
        raise ValueError(f"bits must be a number in [1, 16] or {CEILING!r}, got {bits!r}")
    if max_kl_proxy is not None and not (isinstance(max_kl_proxy, (int, float)) and max_kl_proxy > 0):
        raise ValueError(f"max_kl_proxy must be a number > 0, got {max_kl_proxy!r}")
    if base is not None and not isinstance(base, CodecConfigV2):
        raise TypeError(f"base must be a CodecConfigV2, got {type(base).__name__}")
    if base is not None and base.d != hidden.shape[1]:
        raise ValueError(f"base has d = {base.d}, hidden has d = {hidden.shape[1]}")
    if isinstance(classes, bool) or not isinstance(classes, int) or not 1 <= classes <= rans.MAX_CLASSES:
        raise ValueError(f"classes must be an int in [1, {rans.MAX_CLASSES}], got {classes!r}")
    d = hidden.shape[1]
    if (tokens is None) != (embedding is None):
        raise ValueError("tokens and embedding must be given together (a token prediction needs both)")
    if embedding is not None:
        if not isinstance(embedding, torch.Tensor) or embedding.dim() != 2 or embedding.shape[1] != d \
                or not embedding.is_floating_point():
            raise ValueError(f"embedding must be a floating-point [V, {d}] table, got {getattr(embedding, 'shape', type(embedding))}")
        tokens = torch.as_tensor(tokens).detach().cpu().reshape(-1)
        if tokens.is_floating_point() or tokens.shape[0] != hidden.shape[0] or \
                (tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < embedding.shape[0])):
            raise ValueError(f"tokens must be {hidden.shape[0]} integer ids in [0, {embedding.shape[0]}), one per hidden state")
        tokens = tokens.to(torch.int64)
    shifts: tuple[int, ...] = ()
    if position_sensitivity is not None:
        shifts = position_shifts(position_sensitivity)
        if hidden.shape[0] % position_sensitivity.shape[0]:
            raise ValueError(f"hidden must hold whole windows of the position profile's {position_sensitivity.shape[0]} "
                             f"positions, got {hidden.shape[0]} tokens")
    hidden = hidden.detach().cpu().float()
    sinks = sink_mask(hidden)
    body = hidden[~sinks]
    sink_first = bool(shifts) and bool(sinks[:: position_sensitivity.shape[0]].float().mean() > 0.5)
    # The sink floor insures against sinks the calibration text did not show: it costs its bits
    # but the late step is set as without it, or the late tokens would pay for the insurance
    # (Gemma 3 270M split 6 on Python source: KL 0.0052 -> 0.0076 when they did).
    extra = _shift_costs(shifts, position_sensitivity, sink_first)[0]
    measured = position_shifts(position_sensitivity, sink_floor=False) if shifts else ()
    kl_gain = _shift_costs(measured, position_sensitivity, sink_first)[1]
    if base is not None:
        scales = base.step_array().astype(np.float64)
        scales /= np.median(scales)
    else:
        scales = channel_scales(body, sensitivity)
    value_bits = torch.empty((), dtype=wire_dtype).element_size() * 8
    n_classes = min(classes, d // MIN_CLASS_CHANNELS)
    prediction, saving = None, None
    if embedding is not None:
        prediction, residual, saving = _fit_prediction(hidden, sinks, tokens, embedding, scales, value_bits, n_classes)
        if saving >= PREDICTION_MIN_SAVING:
            body = residual
            value_bits = 32  # escapes and raw tokens of the residual travel in fp32
        else:
            prediction = None
    id_bits = 0 if prediction is None else prediction.id_bits
    pairs: tuple[tuple[int, int], ...] = ()
    if prediction is not None and token_sensitivity is not None and position_sensitivity is not None:
        if token_sensitivity.reshape(-1).shape[0] != hidden.shape[0]:
            raise ValueError(f"token_sensitivity must hold one trace per hidden state ({hidden.shape[0]}), "
                             f"got {token_sensitivity.reshape(-1).shape[0]}")
        pairs, token_extra = token_shifts(tokens, token_sensitivity, position_sensitivity, shifts)
        extra += token_extra
    ceiling = bits == CEILING or (bits is None and max_kl_proxy is None and sensitivity is not None)
    if bits == CEILING:
        bits = default_bits_ceiling(d, id_bits)
    if bits is None and max_kl_proxy is None:
        if sensitivity is None:
            bits = DEFAULT_BITS
        else:
            bits, max_kl_proxy = default_bits_ceiling(d, id_bits), DEFAULT_KL_PROXY
    center = body.median(0).values.numpy().astype(np.float32)
    stats = _Stats(body, center, scales, value_bits, sensitivity, n_classes, id_bits)

    spread = max(float(stats.z.pow(2).mean().sqrt()), 1e-30)
    lo, hi = spread * 2.0**-16, spread * 4.0
    deltas = []
    if max_kl_proxy is not None:
        deltas.append(_bisect(lambda dl: stats.kl_proxy(dl) * kl_gain <= max_kl_proxy, lo, hi)[0])
    if bits is not None:
        # The smallest probed step whose estimated cost (residuals of early positions included) is within the budget.
        deltas.append(_bisect(lambda dl: stats.table(dl)[2] + extra > bits, lo, hi)[1])
    delta = max(deltas)
    freqs, k, est_bits, tables, table_of = stats.table(delta)
    step = (scales * delta).astype(np.float32)
    info = {"target_bits": bits, "max_kl_proxy": max_kl_proxy, "estimated_bits": est_bits + extra, "delta": delta,
            "estimated_bits_late": est_bits, "position_shift": list(shifts),
            "kmax": k, "classes": max(1, len(tables)), "calibration_tokens": int(hidden.shape[0]), "sink_tokens": int(sinks.sum()),
            "scales": "fisher" if sensitivity is not None and base is None else ("base" if base else "uniform"),
            "wire_dtype": str(wire_dtype).replace("torch.", ""), "token_shift": [list(p) for p in pairs]}
    if saving is not None:
        info["prediction_saving"] = float(saving)
    if sensitivity is not None:
        info["kl_proxy"] = stats.kl_proxy(delta) * kl_gain
    if ceiling and max_kl_proxy is not None:
        # Frames then meet RATE_BITS on any text (rate.py), and spend bits the text leaves down to the KL target's step.
        finest = max(-MAX_FRAME_SCALE, min(0, math.floor(4 * math.log2(deltas[0] / delta) + 1e-9)))
        info["rate"] = RatePolicy(RATE_BITS, finest).to_dict()
    return CodecConfigV2(center=tuple(center.tolist()), step=tuple(step.tolist()), kmax=k, freqs=freqs, raw_limit=int(d * RAW_FRACTION),
                         class_freqs=tables, channel_class=table_of, position_shift=shifts, prediction=prediction,
                         token_shift=pairs, info=info)
