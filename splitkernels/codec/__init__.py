"""Activation codec: v1 threshold splitting (TS) then token-wise adaptive bit quantisation (TAB-Q);
v2 calibrated equalisation, exact escapes and static-table rANS (docs/FORMATS.md §3-§5)."""
from .calibrate import calibrate
from .config import DEFAULT_BIT_CHOICES, CodecConfig
from .config_v2 import CodecConfigV2
from .dispatch import decode, encode, from_bytes
from .encoded import Encoded, decode_frame
from .frame import FRAME_VERSION, FrameError, FrameLimitError, FrameLimits
from .frame_v2 import FRAME_VERSION_V2
from .v2 import EncodedV2

__all__ = ["CodecConfig", "CodecConfigV2", "Encoded", "EncodedV2", "encode", "decode", "from_bytes", "decode_frame",
           "calibrate", "FrameError", "FrameLimitError", "FrameLimits", "FRAME_VERSION", "FRAME_VERSION_V2",
           "DEFAULT_BIT_CHOICES"]
