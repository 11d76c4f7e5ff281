"""encode / decode between tensors, fixed-capacity buffers and wire frames."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .. import ops
from ..ops import reference
from ..ops.checks import FLOAT_DTYPES, check_tensor
from .budget import allocate_bits
from .config import CodecConfig
from .frame import FrameContents, FrameError, FrameLimits, frame_nbytes, read_frame, stream_nbytes, write_frame

# Decoding builds the kernels' padded code rows for at most this many bytes of tokens at a time, so
# its scratch memory does not grow with the frame.
_CHUNK_BYTES = 1 << 20


@dataclass
class Encoded:
    """One encoded tensor ``[T, d]``: per-token widths, fp16 ``lo``/``step``, outliers, packed codes.

    Buffers are fixed-capacity (as the kernels write them): ``outlier_idx``/``outlier_val``
    are ``[T, C]`` with ``num_outliers[t]`` slots used, ``codes`` is ``[T, row_bytes]`` with
    ``code_bytes[t]`` bytes used.
    """

    token_bits: torch.Tensor  # u8 [T]
    lo: torch.Tensor  # f16 [T]
    step: torch.Tensor  # f16 [T]
    num_outliers: torch.Tensor  # i32 [T]
    outlier_idx: torch.Tensor  # i32 [T, C]
    outlier_val: torch.Tensor  # dtype [T, C]
    codes: torch.Tensor  # u8 [T, row_bytes]
    code_bytes: torch.Tensor  # i32 [T]
    d: int

    @property
    def dtype(self) -> torch.dtype:
        return self.outlier_val.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self.token_bits.shape[0], self.d)

    @property
    def nbytes(self) -> int:
        """Size of :meth:`to_bytes` in bytes, computed without serialising."""
        t, d = self.shape
        return frame_nbytes(t, d, self.dtype, int(self.num_outliers.sum()), int(self.code_bytes.sum()))

    @property
    def bits_per_element(self) -> float:
        """Frame bits per tensor element, every byte of the frame counted (header and CRC too)."""
        t, d = self.shape
        return 8.0 * self.nbytes / max(t * d, 1)

    def to_bytes(self) -> bytes:
        """Serialise into the wire frame (docs/FORMATS.md)."""
        cnt = self.num_outliers.cpu().long()
        slots = torch.arange(self.outlier_idx.shape[1])
        used = slots < cnt.unsqueeze(-1)
        code_mask = torch.arange(self.codes.shape[1]) < self.code_bytes.cpu().unsqueeze(-1)
        return write_frame(
            FrameContents(
                dtype=self.dtype,
                d=self.d,
                bits=self.token_bits.cpu().numpy(),
                step=self.step.cpu().numpy(),
                lo=self.lo.cpu().numpy(),
                counts=cnt.numpy(),
                indices=self.outlier_idx.cpu()[used].long().numpy(),
                values=self.outlier_val.cpu()[used],
                streams=self.codes.cpu()[code_mask].numpy(),
            )
        )

    def to(self, device: torch.device | str) -> "Encoded":
        moved = {k: getattr(self, k).to(device) for k in _TENSOR_FIELDS}
        return Encoded(**moved, d=self.d)


_TENSOR_FIELDS = ("token_bits", "lo", "step", "num_outliers", "outlier_idx", "outlier_val", "codes", "code_bytes")


def encode(x: torch.Tensor, config: CodecConfig | None = None) -> Encoded:
    """TS + TAB-Q encode of ``x [T, d]`` (fp32/fp16/bf16). Non-finite input raises ValueError.

    With ``config=None`` the default :class:`CodecConfig` is used.
    """
    config = config or CodecConfig()
    if not isinstance(config, CodecConfig):
        raise TypeError(f"config must be a CodecConfig, got {type(config).__name__}")
    check_tensor("x", x, FLOAT_DTYPES, ndim=2)
    if x.shape[1] == 0:
        raise ValueError("x must have d >= 1 channels")
    if not torch.isfinite(x).all():
        raise ValueError("x must be finite: NaN/Inf activations are rejected by the codec")
    capacity = min(config.capacity, x.shape[1])
    choices = [] if config.mode == "passthrough" else list(config.bit_choices)
    args = (x, config.threshold == "abs", config.threshold_value, capacity, choices)
    if config.mode == "budget":
        probe = ops.ts_tabq_encode(*args, eps=0.0, forced_bits=torch.full(
            (x.shape[0],), max(choices), dtype=torch.uint8, device=x.device))
        raw_tokens = probe[0] == reference.raw_width(x.dtype)
        forced = allocate_bits(
            probe[1].float(), probe[3], probe[4], raw_tokens, x.shape[1], x.dtype, config.bit_choices,
            config.avg_bits,
        )
        out = ops.ts_tabq_encode(*args, eps=0.0, forced_bits=forced)
    else:
        out = ops.ts_tabq_encode(*args, eps=config.eps, forced_bits=None)
    bits, lo, step, _hi, cnt, idx, val, codes, nbytes = out
    return Encoded(bits, lo, step, cnt, idx, val, codes, nbytes, x.shape[1])


def decode(encoded: Encoded) -> torch.Tensor:
    """Reconstruct ``[T, d]`` in the encoded tensor's dtype."""
    if not isinstance(encoded, Encoded):
        raise TypeError(f"encoded must be an Encoded, got {type(encoded).__name__}")
    e = encoded
    return ops.ts_tabq_decode(e.token_bits, e.lo, e.step, e.num_outliers, e.outlier_idx, e.outlier_val, e.codes, e.d)


def _stream_offsets(c: FrameContents) -> tuple[np.ndarray, np.ndarray, int]:
    """Each token's stream length and start in ``c.streams``; and the raw width in bits."""
    raw_bits = reference.raw_width(c.dtype)
    nbytes = stream_nbytes(c.bits, c.d, raw_bits)
    return nbytes, np.cumsum(nbytes) - nbytes, raw_bits


def _streams_on(c: FrameContents, device: torch.device) -> torch.Tensor:
    """The frame's compact bit streams as a uint8 tensor on ``device`` (only the used bytes move)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only view of the frame; never written
        host = torch.from_numpy(c.streams)
    return host.to(device)


def _fill_codes(codes: torch.Tensor, streams: torch.Tensor, c: FrameContents, rows: slice, nbytes: np.ndarray,
                offsets: np.ndarray) -> None:
    """Copy the bit streams of tokens ``rows`` into the padded rows ``codes`` (one row per token),
    on the device both tensors are on.

    Tokens of one width have streams of one length, so each width is one gather; its index
    matrix is built a bounded number of rows at a time.
    """
    device = codes.device
    bits = c.bits[rows]
    for b in np.unique(bits):
        local = np.flatnonzero(bits == b)
        length = int(nbytes[rows][local[0]])
        if length == 0:
            continue
        lane = torch.arange(length, device=device)
        per = max(1, _CHUNK_BYTES // (8 * length))
        for i in range(0, local.size, per):
            sel = local[i : i + per]
            starts = torch.from_numpy(offsets[rows][sel]).to(device)
            codes[torch.from_numpy(sel).to(device), :length] = streams[starts[:, None] + lane]


def _check_raw_rows(codes: torch.Tensor, c: FrameContents, rows: slice, raw_bits: int) -> None:
    raw = np.flatnonzero(c.bits[rows] == raw_bits)
    if raw.size and not torch.isfinite(codes[torch.from_numpy(raw).to(codes.device)].view(c.dtype)).all():
        raise FrameError("a raw token holds a non-finite value")


def from_bytes(data: bytes | bytearray | memoryview, limits: FrameLimits | None = None) -> Encoded:
    """Parse a wire frame into (CPU) buffers; raises :class:`FrameError` on anything malformed
    (:class:`~splitkernels.codec.frame.FrameLimitError` when it exceeds ``limits``).

    The buffers are the kernels' fixed-capacity layout (``codes`` is ``[T, d*itemsize]``); to
    decode a received frame with memory bounded by the frame and its output, use
    :func:`decode_frame`.
    """
    c = read_frame(data, frozenset(ops.CODEC_BITS), limits)
    t, d = c.bits.shape[0], c.d
    nbytes, offsets, raw_bits = _stream_offsets(c)
    codes = torch.zeros(t, d * raw_bits // 8, dtype=torch.uint8)
    _fill_codes(codes, _streams_on(c, codes.device), c, slice(0, t), nbytes, offsets)
    _check_raw_rows(codes, c, slice(0, t), raw_bits)
    capacity = int(c.counts.max()) if t else 0
    idx = torch.zeros(t, capacity, dtype=torch.int32)
    val = torch.zeros(t, capacity, dtype=c.dtype)
    if c.indices.size:
        rows = _outlier_tokens(c.counts)
        slots = torch.arange(rows.shape[0]) - torch.from_numpy(np.cumsum(c.counts) - c.counts)[rows]
        idx[rows, slots] = torch.from_numpy(c.indices)
        val[rows, slots] = c.values
    return Encoded(
        token_bits=torch.from_numpy(c.bits),
        lo=torch.from_numpy(c.lo),
        step=torch.from_numpy(c.step),
        num_outliers=torch.from_numpy(c.counts).to(torch.int32),
        outlier_idx=idx,
        outlier_val=val,
        codes=codes,
        code_bytes=torch.from_numpy(nbytes).to(torch.int32),
        d=d,
    )


def _outlier_tokens(counts: np.ndarray) -> torch.Tensor:
    """The token of every outlier, in frame order."""
    return torch.from_numpy(np.repeat(np.arange(counts.shape[0], dtype=np.int64), counts))


def decode_frame(data: bytes | bytearray | memoryview, limits: FrameLimits | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Validate and decode a wire frame straight to ``[T, d]`` on ``device`` (default CPU).

    Equal to ``decode(from_bytes(data).to(device))``, but memory stays within the frame, the
    output tensor and a fixed scratch size: only the frame's used bytes are copied to the device,
    tokens are expanded into the kernels' padded rows and decoded there a bounded chunk at a time,
    and the outliers are written into the output afterwards, without padded ``[T, capacity]``
    buffers. This is the decoder a server runs on untrusted frames.
    """
    c = read_frame(data, frozenset(ops.CODEC_BITS), limits)
    t, d = c.bits.shape[0], c.d
    device = torch.device(device or "cpu")
    nbytes, offsets, raw_bits = _stream_offsets(c)
    row_bytes = d * raw_bits // 8
    out = torch.empty(t, d, dtype=c.dtype, device=device)
    streams = _streams_on(c, device)
    chunk = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(0, t, chunk):
        rows = slice(start, min(start + chunk, t))
        n = rows.stop - rows.start
        codes = torch.zeros(n, row_bytes, dtype=torch.uint8, device=device)  # padded rows, built on the device
        _fill_codes(codes, streams, c, rows, nbytes, offsets)
        _check_raw_rows(codes, c, rows, raw_bits)
        meta = [torch.from_numpy(a[rows]).to(device) for a in (c.bits, c.lo, c.step)]
        none = torch.zeros(n, 0, dtype=torch.int32, device=device)  # outliers are written afterwards
        out[rows] = ops.ts_tabq_decode(*meta, torch.zeros(n, dtype=torch.int32, device=device), none,
                                       none.to(c.dtype), codes, d)
    if c.indices.size:
        out[_outlier_tokens(c.counts).to(device), torch.from_numpy(c.indices).long().to(device)] = c.values.to(device)
    return out
