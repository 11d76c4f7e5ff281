"""Codec v2 reference encoder/decoder: equalise, split off exact escapes, quantise (docs/FORMATS.md §5).

Per value ``x`` of channel ``c``: ``v = fp32(fp32(x) - center[c]) * inv_step[c]``. ``|v| <= kmax`` -> symbol
``rint_half_even(v) + kmax``; otherwise the escape symbol and the exact value travels in the input
dtype. A token with more than ``raw_limit`` escapes travels raw (every value exact). The threshold
is per channel and static (``kmax * step[c]``), so no single channel or token sets the step of
the others. Entropy coding of the symbols happens when the frame is written (``frame_v2``).

The quantiser and dequantiser run as one fused C++ pass on the host when the extension is built
(bit-exact with the PyTorch reference kept here). GPU tensors run the fused device pass of the
cuda or triton backend and come back in one compact copy (:mod:`.v2_device`); without one they
are copied to the host first.
"""
from __future__ import annotations

import numpy as np
import torch

from .._native import load
from ..ops.checks import FLOAT_DTYPES, check_tensor
from . import frame_center, v2_device
from .config_v2 import CodecConfigV2
from .frame import DTYPE_CODES
from .frame_v2 import MAX_POSITION, EncodedV2

_C, _ = load("_C")


def has_fused() -> bool:
    """True when the C++ extension provides the fused v2 quantiser and dequantiser."""
    return _C is not None and hasattr(_C, "v2_quantise")


def quantise_reference(x: torch.Tensor, config: CodecConfigV2,
                       center: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symbols u8 ``[T, d]`` (escape symbol where ``|v| > kmax``) and the escape mask, before the
    raw rule; ``center``: a frame's centers (:mod:`.frame_center`) instead of the config's."""
    inv = torch.tensor(config.inv_step_array()).to(x.device)
    center = torch.tensor(config.center_array() if center is None else center).to(x.device)
    v = (x.float() - center) * inv
    k = config.kmax
    esc = ~(v.abs() <= k)
    q = torch.round(v.clamp(-k, k))  # round half to even
    sym = torch.where(esc, torch.full_like(q, config.escape_symbol), q + k).to(torch.uint8)
    return sym, esc


def _fused_pass(x: torch.Tensor, config: CodecConfigV2,
                center: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The one-pass C++ quantiser on contiguous host ``x``: symbols (raw rows 0), raw flags, the
    escaped values of the coded tokens (input dtype) and how many inputs were not finite."""
    t, d = x.shape
    sym = torch.empty(t, d, dtype=torch.uint8)
    n_esc = torch.empty(t, dtype=torch.int32)
    raw = torch.empty(t, dtype=torch.uint8)
    escapes = torch.empty(t * d, dtype=x.dtype)  # never touched beyond what is written
    center, inv = config.center_array() if center is None else center, config.inv_step_array()
    written, nonfinite = _C.v2_quantise(x.data_ptr(), DTYPE_CODES[x.dtype], t, d, center.ctypes.data, inv.ctypes.data,
                                        config.kmax, config.raw_limit, sym.data_ptr(), n_esc.data_ptr(), raw.data_ptr(),
                                        escapes.data_ptr())
    return sym, raw.bool(), escapes[:written], nonfinite


def quantise(x: torch.Tensor, config: CodecConfigV2, fused: bool | None = None,
             center: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symbols u8 ``[T, d]`` after the raw rule (raw rows all 0) and the raw flags ``[T]``.

    ``fused``: the one-pass C++ kernel (default when built) or the PyTorch reference; bit-exact.
    ``center``: a frame's centers instead of the config's.
    """
    if fused is None:
        fused = has_fused()
    if not fused:
        sym, esc = quantise_reference(x, config, center)
        raw = esc.sum(1) > config.raw_limit
        sym[raw] = 0
        return sym, raw
    sym, raw, _, _ = _fused_pass(x.detach().cpu().contiguous(), config, center)
    return sym, raw


def dequantise(sym: torch.Tensor, config: CodecConfigV2, dtype: torch.dtype, fused: bool | None = None,
               center: np.ndarray | None = None) -> torch.Tensor:
    """``fp32(fp32((sym - kmax) * step) + center)`` in ``dtype`` for every value (no exact
    overwrites); ``center``: a frame's centers instead of the config's."""
    if fused is None:
        fused = has_fused()
    step, center = config.step_array(), config.center_array() if center is None else center
    if not fused:
        return ((sym.to(torch.int32) - config.kmax).float() * torch.tensor(step) + torch.tensor(center)).to(dtype)
    sym = sym.cpu().contiguous()
    out = torch.empty(sym.shape, dtype=dtype)
    _C.v2_dequantise(sym.data_ptr(), sym.shape[0], sym.shape[1], step.ctypes.data, center.ctypes.data, config.kmax,
                     DTYPE_CODES[dtype], out.data_ptr(), 0, 0, -1)
    return out


def refine(x: torch.Tensor, sym: torch.Tensor, raw: torch.Tensor, config: CodecConfigV2,
           start: int, tokens: torch.Tensor | None = None, center: np.ndarray | None = None) -> torch.Tensor | None:
    """Fine codes of the leading rows of ``x [T, d]`` (first token at position ``start``) that the
    config's position shifts make finer (docs/FORMATS.md §5.2): ``fine = rint(v * 2**s)`` splits into
    the coarse code ``(fine + 2**(s-1)) >> s``, written over those rows of ``sym`` in place, and the
    residual ``fine - (coarse << s)`` returned as i8 ``[T_s, d]`` (0 at escapes and raw rows). None
    when no row of the frame is shifted. Escapes are unchanged (same test as the plain quantiser).
    ``tokens``: the frame's ids, which a config's token shifts need (§5.2.2); ``center``: the
    frame's centers when it has center offsets."""
    shifts = config.row_shifts(start, x.shape[0], tokens)
    if not shifts.any():
        return None
    # In numpy: a few rows of a frame, where torch's per-op cost was most of the time (one token,
    # d = 576: 89 -> 45 us). fp32 IEEE subtraction and product as torch's; np.rint rounds half to even.
    n, k = shifts.shape[0], config.kmax
    center = config.center_array() if center is None else center
    v = (x[:n].detach().cpu().float().numpy() - center) * config.inv_step_array()
    s = shifts[:, None].astype(np.int32)
    with np.errstate(invalid="ignore"):  # NaN rows: not kept below
        fine = np.rint(np.clip(v, -k, k) * np.exp2(s).astype(np.float32)).astype(np.int32)  # times 2**s: exact
    coarse = (fine + ((1 << s) >> 1)) >> s  # arithmetic shift: floor
    keep = (np.abs(v) <= k) & ~raw[:n, None].numpy()
    sym_rows = sym[:n].numpy()
    np.copyto(sym_rows, (coarse + k).astype(np.uint8), where=keep)
    return torch.from_numpy(np.where(keep, fine - (coarse << s), 0).astype(np.int8))


def apply_residuals(y: torch.Tensor, enc: EncodedV2) -> torch.Tensor:
    """Overwrite the shifted rows of the decoded ``y`` with their fine values (escapes and raw rows
    stay): ``fp32(fp32(fine * fp32(step * 2**-s)) + center)`` in ``y``'s dtype."""
    if enc.residuals is None:
        return y
    cfg = enc.config
    n = enc.residuals.shape[0]
    # In numpy, as refine (one token, d = 576: 70 -> 39 us); only the rounding to y's dtype in torch.
    s = cfg.row_shifts(enc.start, enc.shape[0], enc.tokens)[:, None].astype(np.int32)
    sym = enc.symbols[:n].cpu().numpy().astype(np.int32)
    keep = (sym != cfg.escape_symbol) & ~enc.raw[:n, None].cpu().numpy() & (s > 0)
    fine = ((sym - cfg.kmax) << s) + enc.residuals.cpu().numpy().astype(np.int32)
    step = cfg.step_array()[None, :] * np.exp2(-s).astype(np.float32)  # exact: no shift makes a step subnormal
    value = fine.astype(np.float32) * step + enc.center_array()  # two fp32 roundings, as the plain decode
    value = torch.from_numpy(value).to(y.dtype)
    y[:n] = torch.where(torch.from_numpy(keep).to(y.device), value.to(y.device), y[:n])
    return y


def predicted_input(x: torch.Tensor, config: CodecConfigV2, tokens, embedding) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the quantiser codes and the token ids a frame carries: ``(x, None)`` without a
    prediction, else ``(fp32(fp32(x) - p), ids)`` with the config's prediction ``p`` (docs/FORMATS.md §5.2.1)."""
    pred = config.prediction
    if pred is None:
        return x, None
    ids = pred.check_tokens(tokens, x.shape[0])
    pred.check_table(embedding)
    return x.float() - pred.values(ids, embedding, x.device), ids


def add_prediction(y: torch.Tensor, enc: EncodedV2, embedding) -> torch.Tensor:
    """``fp32(y + p)`` of a decoded residual ``y`` under the config's prediction; ``y`` unchanged without one."""
    pred = enc.config.prediction
    if pred is None:
        return y
    pred.check_table(embedding)
    return y.float() + pred.values(enc.tokens, embedding, y.device)


def encode_v2(x: torch.Tensor, config: CodecConfigV2, start: int = 0, tokens=None,
              embedding: torch.Tensor | None = None) -> EncodedV2:
    """v2 encode of ``x [T, d]`` (fp32/fp16/bf16, finite) with a calibrated config: the device pass
    of the cuda/triton backend for GPU tensors, else one fused C++ pass when built (quantise, count
    escapes, gather them, check finiteness), else the reference. The result holds host tensors.

    ``start``: the sequence position of ``x``'s first token (0: ``x`` starts a sequence); with the
    config's position shifts, early positions get finer codes (:func:`refine`). ``tokens`` (the
    ``[T]`` token ids) and ``embedding`` (the input embedding table): needed when the config has
    a prediction, which then codes the residual in fp32; ignored otherwise."""
    if not isinstance(config, CodecConfigV2):
        raise TypeError(f"config must be a CodecConfigV2, got {type(config).__name__}")
    check_tensor("x", x, FLOAT_DTYPES, ndim=2)
    if x.shape[1] != config.d:
        raise ValueError(f"x must have d = {config.d} channels (the config's), got {x.shape[1]}")
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= MAX_POSITION:
        raise ValueError(f"start must be an int position in [0, {MAX_POSITION}], got {start!r}")
    x, ids = predicted_input(x, config, tokens, embedding)
    run = v2_device.kernel(v2_device.ENCODE_OP, x.device)
    if run is None:
        x = x.detach().cpu().contiguous()
    offsets, center = _center_offsets(x, config, run)
    if run is not None:
        sym, raw, escapes, raw_values, nonfinite = v2_device.encode(x.detach(), config, run, center)
    else:
        if has_fused():
            sym, raw, escapes, nonfinite = _fused_pass(x, config, center)
        else:
            nonfinite = int((~torch.isfinite(x)).sum())
            sym, raw = quantise(x, config, fused=False, center=center)
            escapes = x[sym == config.escape_symbol]  # raw rows hold no escape symbols
        raw_values = x[raw] if raw.any() else x[:0]
    if nonfinite:
        raise ValueError("x must be finite: NaN/Inf activations are rejected by the codec")
    residuals = refine(x, sym, raw, config, start, ids, center)
    return EncodedV2(sym, raw, escapes, raw_values, config, None if residuals is None else start, residuals, ids,
                     offsets)


def _center_offsets(x: torch.Tensor, config: CodecConfigV2, run) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The center offsets of a frame of ``x`` and the centers they give (:func:`frame_center.fit`
    on its sampled tokens, quantised with the config's center by the device kernel ``run`` or on
    the host: in one C++ call when built); ``(None, None)`` when the frame carries none."""
    if x.shape[0] < frame_center.MIN_TOKENS:
        return None, None
    if run is None and has_fused():
        offsets = np.empty(config.d, dtype=np.int8)
        if not _C.v2_center_offsets(x.data_ptr(), DTYPE_CODES[x.dtype], x.shape[0], config.d, config.center_array().ctypes.data,
                                    config.inv_step_array().ctypes.data, config.kmax, config.raw_limit, offsets.ctypes.data):
            offsets = None
    else:
        sample = x[torch.from_numpy(frame_center.sample_rows(x.shape[0])).to(x.device)].detach()
        sym, raw = v2_device.encode(sample, config, run)[:2] if run is not None else quantise(sample, config)
        offsets = frame_center.fit(sym.numpy(), raw.numpy(), config.kmax)
    if offsets is None:
        return None, None
    center = frame_center.centers(config, offsets)
    return (offsets, center) if np.isfinite(center).all() else (None, None)


def decode_v2(enc: EncodedV2, device: torch.device | str | None = None, embedding: torch.Tensor | None = None) -> torch.Tensor:
    """v2 decode: ``fp32(fp32((s - kmax) * step) + center)`` rounded to the dtype (no FMA); escapes
    and raw tokens exact. On ``device`` (default: the host): a GPU runs the device pass of the
    cuda/triton backend after one host-to-device copy; the host runs one fused C++ pass when built
    (escapes placed in it), else the reference, and the result is then moved to ``device``.
    With the config's prediction, ``embedding`` (the input embedding table) is needed and the
    prediction is added to the decoded residual (fp32 result)."""
    if not isinstance(enc, EncodedV2):
        raise TypeError(f"encoded must be an EncodedV2, got {type(enc).__name__}")
    cfg = enc.config
    center = enc.center_array()
    if device is not None:
        device = torch.device(device)
        run = v2_device.kernel(v2_device.DECODE_OP, device)
        if run is not None:
            y = v2_device.decode(enc.symbols, enc.raw, enc.escapes, enc.raw_values, cfg, device, run,
                                 None if enc.center_offset is None else center)
            y = apply_residuals(y, enc)
            return add_prediction(y, enc, embedding)
    sym = enc.symbols.contiguous()
    if has_fused():
        y = torch.empty(sym.shape, dtype=enc.dtype)
        raw = enc.raw.to(torch.uint8).contiguous()
        escapes = enc.escapes.contiguous()
        _C.v2_dequantise(sym.data_ptr(), sym.shape[0], sym.shape[1], cfg.step_array().ctypes.data,
                         center.ctypes.data, cfg.kmax, DTYPE_CODES[enc.dtype], y.data_ptr(), raw.data_ptr(),
                         escapes.data_ptr(), escapes.numel())
    else:
        y = dequantise(sym, cfg, enc.dtype, fused=False, center=center)
        y.masked_scatter_(sym == cfg.escape_symbol, enc.escapes)  # raw rows hold no escape symbols
    if enc.raw_values.shape[0]:
        y[enc.raw] = enc.raw_values
    y = add_prediction(apply_residuals(y, enc), enc, embedding)
    return y if device is None else y.to(device)
