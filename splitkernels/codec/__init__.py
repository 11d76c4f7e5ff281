"""Activation codec: v1 threshold splitting (TS) then token-wise adaptive bit quantisation (TAB-Q);
v2 calibrated equalisation, exact escapes and static-table rANS, Rice or nibble coding (docs/FORMATS.md §3-§5)."""
from .calibrate import calibrate
from .config import DEFAULT_BIT_CHOICES, CodecConfig
from .config_v2 import CodecConfigV2
from .dispatch import decode, decode_frame, encode, encode_frame, from_bytes, is_v2_frame
from .encoded import Encoded
from .frame import FRAME_VERSION, FrameError, FrameLimitError, FrameLimits
from .frame_v2 import FRAME_VERSION_V2
from .spec import config_from_spec
from .v2 import EncodedV2

__all__ = ["CodecConfig", "CodecConfigV2", "Encoded", "EncodedV2", "encode", "decode", "from_bytes", "decode_frame", "encode_frame",
           "calibrate", "config_from_spec", "is_v2_frame", "FrameError", "FrameLimitError", "FrameLimits", "FRAME_VERSION", "FRAME_VERSION_V2",
           "DEFAULT_BIT_CHOICES"]
