"""encode / decode between tensors, fixed-capacity buffers and wire frames."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..ops import reference
from ..ops.checks import FLOAT_DTYPES, check_tensor
from .budget import allocate_bits
from .config import CodecConfig
from .frame import FrameContents, FrameError, frame_nbytes, read_frame, stream_nbytes, write_frame


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


def from_bytes(data: bytes | bytearray | memoryview) -> Encoded:
    """Parse a wire frame into (CPU) buffers; raises :class:`FrameError` on anything malformed."""
    c = read_frame(data, frozenset(ops.CODEC_BITS))
    t, d = c.bits.shape[0], c.d
    raw_bits = reference.raw_width(c.dtype)
    row_bytes = d * raw_bits // 8
    capacity = int(c.counts.max()) if t else 0
    nbytes = stream_nbytes(c.bits, d, raw_bits)
    codes = torch.zeros(t, row_bytes, dtype=torch.uint8)
    codes[torch.arange(row_bytes) < torch.from_numpy(nbytes).unsqueeze(-1)] = torch.from_numpy(c.streams)
    raw_rows = torch.from_numpy(c.bits == raw_bits)
    if raw_rows.any() and not torch.isfinite(codes[raw_rows].view(c.dtype)).all():
        raise FrameError("a raw token holds a non-finite value")
    used = torch.arange(capacity) < torch.from_numpy(c.counts).unsqueeze(-1)
    idx = torch.zeros(t, capacity, dtype=torch.int32)
    idx[used] = torch.from_numpy(c.indices).to(torch.int32)
    val = torch.zeros(t, capacity, dtype=c.dtype)
    val[used] = c.values
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
