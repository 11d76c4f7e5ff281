"""Pure-PyTorch reference implementations: the ground truth for every backend.

Written for clarity, not speed. Formats and rounding rules are specified in docs/FORMATS.md and
written once in :mod:`splitkernels.formats`, whose plain-PyTorch definitions of the bit stream
and the packed weight serve here as the reference kernels; fast backends must reproduce the
integer outputs of these functions bit for bit.
"""
from __future__ import annotations

import torch

# Format definitions, re-exported here because they are also the reference kernels (and for the
# callers that imported them from this module before splitkernels.formats existed).
from ..formats import (
    EncodedBuffers,
    dequantize_weight,
    empty_encode_buffers,
    estimated_sq_error,
    exact_div,
    pack_bits,
    pack_weight_codes,
    packed_nbytes,
    packed_words,
    raw_width,
    round_down_fp16,
    round_up_fp16,
    step_for,
    unpack_bits,
    unpack_weight_codes,
)

# ---------------------------------------------------------------- low-bit linear


def lowbit_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y = x @ dequant(W).T + bias, computed in fp32 and returned in x's dtype."""
    k = x.shape[-1]
    w = dequantize_weight(qweight, scale.float(), zero.float(), bits, group_size, k)
    y = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


# ---------------------------------------------------------------- int8 W8A8


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: q = round_half_even(x / s), s = absmax / 127 (fp32); zero rows get s = 1."""
    xf = x.float()
    s = exact_div(xf.abs().amax(-1), 127.0)
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.clamp(torch.round(xf / s.unsqueeze(-1)), -127, 127).to(torch.int8)
    return q, s


def int8_linear(
    x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """W8A8: per-token int8 activations x per-channel int8 weights, exact integer accumulation."""
    shape = x.shape
    xq, xs = quantize_rows_int8(x.reshape(-1, shape[-1]))
    # float64 holds every int8 x int8 sum exactly for K < 2^38, so this is the int32 result.
    acc = (xq.double() @ w_int8.double().T).to(torch.int32)
    y = acc.float() * xs.unsqueeze(-1) * w_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], w_int8.shape[0])


# ---------------------------------------------------------------- TS + TAB-Q codec


def split_outliers(
    x: torch.Tensor, abs_threshold: bool, threshold: float, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Threshold splitting. Returns (cnt int32[T], idx int32[T,C], val x.dtype[T,C], outlier mask [T,d]).

    Outliers: |x| > tau, tau = threshold (abs) or threshold * rms(x_t) (rms, fp64 sum of
    squares). At most ``capacity`` per token: largest magnitude first, ties to the lower
    channel. Indices ascending; unused slots hold index 0 and value 0.
    """
    t, d = x.shape
    absx = x.float().abs().double()
    if abs_threshold:
        tau = torch.full((t, 1), float(threshold), dtype=torch.float64, device=x.device)
    else:
        tau = threshold * torch.sqrt(exact_div((absx * absx).sum(-1, keepdim=True), d))
    candidate = absx > tau
    key = torch.where(candidate, absx, torch.full_like(absx, -1.0))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :capacity]
    chosen = torch.gather(candidate, 1, order)
    cnt = chosen.sum(-1).to(torch.int32)
    idx = torch.where(chosen, order, torch.full_like(order, d)).sort(-1).values
    used = idx < d
    idx = torch.where(used, idx, torch.zeros_like(idx))
    val = torch.where(used, torch.gather(x, 1, idx), torch.zeros((), dtype=x.dtype, device=x.device))
    # scatter_add, not scatter: unused slots alias channel 0 and must not clear a real outlier there.
    mask = torch.zeros(t, d, dtype=torch.int32, device=x.device).scatter_add_(1, idx, used.to(torch.int32)) > 0
    return cnt, idx.to(torch.int32), val, mask


def inlier_range(xf: torch.Tensor, inlier: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo rounded down to fp16, hi) per token, fp32; a token without inliers gets (0, 0)."""
    inf = torch.tensor(float("inf"), device=xf.device)
    has = inlier.any(-1)
    lo = torch.where(inlier, xf, inf).amin(-1)
    hi = torch.where(inlier, xf, -inf).amax(-1)
    zero = torch.zeros_like(lo)
    # "+ 0.0" turns a -0 extreme into +0, so lo/hi bytes do not depend on where -0 and +0 sit.
    return round_down_fp16(torch.where(has, lo, zero) + 0.0), torch.where(has, hi, zero) + 0.0


def choose_bits(
    lo16: torch.Tensor,
    hi: torch.Tensor,
    n_inliers: torch.Tensor,
    inlier_sq_norm: torch.Tensor,
    bit_choices: list[int],
    eps: float,
    raw: int,
) -> torch.Tensor:
    """Mode ``error``: smallest b with n_in*step_b^2/12 <= eps^2*||inliers||^2 and lo, step finite."""
    chosen = torch.full_like(n_inliers, raw, dtype=torch.int32)
    budget = eps * eps * inlier_sq_norm
    for b in sorted(bit_choices, reverse=True):
        step = step_for(lo16, hi, b)
        ok = torch.isfinite(lo16) & torch.isfinite(step) & (estimated_sq_error(step, n_inliers) <= budget)
        chosen = torch.where(ok, torch.full_like(chosen, b), chosen)
    return chosen


def ts_tabq_encode(
    x: torch.Tensor,
    abs_threshold: bool,
    threshold: float,
    capacity: int,
    bit_choices: list[int],
    eps: float,
    forced_bits: torch.Tensor | None,
) -> EncodedBuffers:
    """Fused TS + TAB-Q encode of x [T, d] into fixed-capacity buffers.

    Returns :class:`~splitkernels.formats.EncodedBuffers` (bits u8[T], lo f16[T], step f16[T],
    hi f32[T], cnt i32[T], idx i32[T,C],
    val x.dtype[T,C], codes u8[T, d*itemsize], nbytes i32[T]). ``forced_bits`` (u8[T]) replaces
    the error-mode choice; a forced width whose lo/step do not fit fp16 still falls back to raw.
    """
    t, d = x.shape
    raw = raw_width(x.dtype)
    cnt, idx, val, outlier = split_outliers(x, abs_threshold, threshold, capacity)
    inlier = ~outlier
    xf = x.float()
    lo16, hi = inlier_range(xf, inlier)
    n_in = (d - cnt).to(torch.int32)
    xin = torch.where(inlier, xf, torch.zeros_like(xf)).double()
    sq_norm = (xin * xin).sum(-1)
    if forced_bits is None:
        bits = choose_bits(lo16, hi, n_in, sq_norm, bit_choices, eps, raw)
    else:
        bits = forced_bits.to(torch.int32)
        for b in set(bits.tolist()) - {raw}:
            fits = torch.isfinite(lo16) & torch.isfinite(step_for(lo16, hi, b))
            bits = torch.where((bits == b) & ~fits, torch.full_like(bits, raw), bits)

    row_bytes = d * (raw // 8)
    codes = torch.zeros(t, row_bytes, dtype=torch.uint8, device=x.device)
    nbytes = torch.zeros(t, dtype=torch.int32, device=x.device)
    lo_out = torch.zeros(t, dtype=torch.float32, device=x.device)
    step_out = torch.zeros(t, dtype=torch.float32, device=x.device)
    for b in sorted(set(bits.tolist())):
        rows = (bits == b).nonzero().flatten()
        if b == raw:
            inl = torch.where(inlier[rows], x[rows], torch.zeros((), dtype=x.dtype, device=x.device))
            codes[rows] = inl.contiguous().view(torch.uint8)
            nbytes[rows] = row_bytes
            continue
        step = step_for(lo16[rows], hi[rows], b)
        q = torch.round((xf[rows] - lo16[rows, None]) / step[:, None])
        q = torch.where(step[:, None] > 0, q, torch.zeros_like(q)).clamp(0, 2**b - 1)
        q = torch.where(inlier[rows], q, torch.zeros_like(q)).to(torch.uint8)
        nb = packed_nbytes(d, b)
        codes[rows, :nb] = pack_bits(q, b)
        nbytes[rows] = nb
        lo_out[rows] = lo16[rows]
        step_out[rows] = step
    return EncodedBuffers(
        bits.to(torch.uint8), lo_out.to(torch.float16), step_out.to(torch.float16), hi, cnt, idx, val, codes, nbytes
    )


def ts_tabq_decode(
    bits: torch.Tensor,
    lo: torch.Tensor,
    step: torch.Tensor,
    cnt: torch.Tensor,
    idx: torch.Tensor,
    val: torch.Tensor,
    codes: torch.Tensor,
    d: int,
) -> torch.Tensor:
    """Decode buffers into x^ [T, d] in the dtype of ``val``: x^ = q*step + lo (fp32, no FMA), outliers exact."""
    t = bits.shape[0]
    dtype = val.dtype
    raw = raw_width(dtype)
    out = torch.zeros(t, d, dtype=dtype, device=bits.device)
    for b in sorted(set(bits.to(torch.int32).tolist())):
        rows = (bits.to(torch.int32) == b).nonzero().flatten()
        if b == raw:
            out[rows] = codes[rows, : d * (raw // 8)].contiguous().view(dtype)
            continue
        q = unpack_bits(codes[rows], b, d).float()
        xq = q * step[rows].float().unsqueeze(-1)
        out[rows] = (xq + lo[rows].float().unsqueeze(-1)).to(dtype)
    if idx.shape[1] > 0:
        slots = torch.arange(idx.shape[1], device=idx.device)
        used = slots < cnt.unsqueeze(-1)
        rows = torch.arange(t, device=idx.device).unsqueeze(-1).expand_as(idx)
        out[rows[used], idx[used].long()] = val[used]
    return out


__all__ = [
    "pack_bits", "unpack_bits", "pack_weight_codes", "unpack_weight_codes", "dequantize_weight",
    "lowbit_linear", "quantize_rows_int8", "int8_linear", "ts_tabq_encode", "ts_tabq_decode",
    "packed_nbytes", "packed_words", "raw_width", "step_for", "estimated_sq_error", "empty_encode_buffers",
    "round_down_fp16", "round_up_fp16",
]
