"""A native decode path for decoder layers on the CPU (llama's and the variants of 45 transformers
families, ``FAST_FAMILIES``): one C++ call per token for a whole range of layers (and the LM head
with a fused exact top k), over a static KV cache. Models it does not cover keep their own eager
forward; :func:`describe` says why."""
from .cache import FastCache
from .native import HEAD_FORMATS, LogitMap, NativeDecoder, NativeHead, quantize_rows_int8
from .spec import FAST_FAMILIES, DecoderDescription, FastPathUnsupported, describe

__all__ = ["FastCache", "HEAD_FORMATS", "LogitMap", "NativeDecoder", "NativeHead", "quantize_rows_int8",
           "FAST_FAMILIES", "DecoderDescription", "FastPathUnsupported", "describe"]
