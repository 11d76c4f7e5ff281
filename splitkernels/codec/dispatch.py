"""Version dispatch of the public codec API: v1 (self-describing TS + TAB-Q) and v2 (calibrated).

The configuration type picks the encoder; the frame's version byte picks the parser. v1 frames
decode as before without a config; v2 frames need the session's :class:`CodecConfigV2`.
"""
from __future__ import annotations

import torch

from . import encoded as v1
from .config import CodecConfig
from .config_v2 import CodecConfigV2
from .frame import MAGIC, FrameError, FrameLimits
from .frame_v2 import FRAME_VERSION_V2, is_token_tag, read_frame_v2
from . import v2_device
from .token_frame import decode_token_frame
from .v2 import EncodedV2, decode_v2, encode_v2
from .wire_dtype import to_wire
from .wire_v2 import decode_frame_v2, encode_frame_v2


def encode(x: torch.Tensor, config: CodecConfig | CodecConfigV2 | None = None, *,
           start: int = 0, tokens=None, embedding: torch.Tensor | None = None) -> v1.Encoded | EncodedV2:
    """Encode ``x [T, d]``: v2 with a :class:`CodecConfigV2`, else v1 (default :class:`CodecConfig`).
    ``start``: the sequence position of ``x``'s first token (v2 codes early positions finer when
    the config has position shifts; v1 ignores it). ``tokens`` (the ``[T]`` token ids) and
    ``embedding`` (the model's input embedding table): needed by a v2 config with a prediction,
    ignored otherwise."""
    if isinstance(config, CodecConfigV2):
        return encode_v2(x, config, start, tokens, embedding)
    return v1.encode(x, config)


def encode_frame(x: torch.Tensor, config: CodecConfig | CodecConfigV2 | None = None,
                 coder: str | None = None, *, start: int = 0, tokens=None, embedding: torch.Tensor | None = None,
                 wire_dtype: torch.dtype | None = None) -> bytes:
    """The wire frame of ``x [T, d]``, the bytes of ``encode(to_wire(x, wire_dtype), config, start=start,
    tokens=tokens, embedding=embedding).to_bytes(coder)``; v2 frames with the nibble coder (``coder``
    "nibble") take the fused quantise-and-code pass (no symbol matrix) unless they have shifted rows or a
    prediction, and one-token rANS frames round to ``wire_dtype`` inside their one C++ call."""
    if isinstance(config, CodecConfigV2):
        return encode_frame_v2(x, config, coder, start, tokens, embedding, wire_dtype)
    if coder is not None:
        raise ValueError("coder applies to codec v2 frames only")
    return v1.encode(to_wire(x, wire_dtype), config).to_bytes()


def decode(encoded: v1.Encoded | EncodedV2, *, embedding: torch.Tensor | None = None) -> torch.Tensor:
    """Reconstruct ``[T, d]`` from a v1 or v2 encoded tensor; ``embedding``: the input embedding
    table, which a v2 config with a prediction needs (ignored otherwise)."""
    if isinstance(encoded, EncodedV2):
        return decode_v2(encoded, embedding=embedding)
    return v1.decode(encoded)


def from_bytes(data: bytes | bytearray | memoryview, config: CodecConfigV2 | None = None, *,
               limits: FrameLimits | None = None) -> v1.Encoded | EncodedV2:
    """Parse a wire frame; raises :class:`FrameError` on anything malformed.

    v2 frames need ``config`` (the session's calibrated config) and raise FrameError when it is
    missing or is not the one the frame was encoded with; v1 frames ignore it. ``limits`` (v1) are
    the receiver's limits, checked against the header before anything is allocated.
    """
    if is_v2_frame(data):
        return read_frame_v2(data, config, limits)
    if config is not None and not isinstance(config, CodecConfigV2):
        raise FrameError(f"config must be a CodecConfigV2 or None, got {type(config).__name__}")
    return v1.from_bytes(data, limits)


def _on_host(device: torch.device | str | None) -> bool:
    """Whether ``device`` (None: the host) names the CPU."""
    if device is None:
        return True
    return (device if type(device) is torch.device else torch.device(device)).type == "cpu"


def is_v2_frame(data: object) -> bool:
    """True when ``data`` starts like a v2 frame (magic and version byte, or a token-form tag); nothing
    else is checked."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return False
    head = bytes(memoryview(data).cast("B")[:5])
    return (len(head) > 0 and is_token_tag(head[0])) or (len(head) == 5 and head[:4] == MAGIC and head[4] == FRAME_VERSION_V2)


def decode_frame(data: bytes | bytearray | memoryview, limits: FrameLimits | None = None,
                 device: torch.device | str | None = None, *, config: CodecConfigV2 | None = None,
                 embedding: torch.Tensor | None = None) -> torch.Tensor:
    """Validate and decode an untrusted wire frame straight to ``[T, d]`` on ``device`` (what a server runs).

    v1 frames go through :func:`splitkernels.codec.encoded.decode_frame` (bounded scratch); v2
    frames need the session's ``config`` (FrameError when it is missing or not the frame's); their
    host allocations are bounded by the frame's own size. A one-token rANS frame decoded on the
    host takes one C++ call (:mod:`.token_frame`; anything it declines takes the path below, the
    reference). Otherwise on the host they run the fused pass
    (entropy decode + dequantise per row); on a GPU they are dequantised there (the device pass,
    after one host-to-device copy). A config with a prediction needs ``embedding``, the input
    embedding table (its frames take the general path).
    """
    # One token, rANS: one C++ call, tried first (None for any other frame, v1 included: a token
    # tag is a v2 frame's first byte). Right after the server's forward pass every Python step
    # here runs cold, ~20 us each on a Zen 3, so it comes before the version checks.
    if type(config) is CodecConfigV2 and _on_host(device):
        out = decode_token_frame(data, config, limits, embedding)
        if out is not None:
            return out
    if is_v2_frame(data):
        if device is not None and v2_device.kernel(v2_device.DECODE_OP, torch.device(device)) is not None:
            return decode_v2(read_frame_v2(data, config, limits), device, embedding)  # the device pass
        out = decode_frame_v2(data, config, limits, embedding)  # the fused host pass, no symbol matrix
        return out if device is None else out.to(device)
    return v1.decode_frame(data, limits, device)
