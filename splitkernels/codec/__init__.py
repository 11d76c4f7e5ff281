"""Activation codec: threshold splitting (TS) then token-wise adaptive bit quantisation (TAB-Q)."""
from .config import DEFAULT_BIT_CHOICES, CodecConfig
from .encoded import Encoded, decode, decode_frame, encode, from_bytes
from .frame import FRAME_VERSION, FrameError, FrameLimitError, FrameLimits

__all__ = ["CodecConfig", "Encoded", "encode", "decode", "from_bytes", "decode_frame", "FrameError", "FrameLimitError", "FrameLimits", "FRAME_VERSION", "DEFAULT_BIT_CHOICES"]
