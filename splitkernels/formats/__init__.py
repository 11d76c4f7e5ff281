"""The format layer: docs/FORMATS.md in code. Constants, sizes, dtype codes, the plain-PyTorch
definitions of each layout, and the containers that carry them (:class:`QuantizedWeight`,
:class:`EncodedBuffers`).

This package imports nothing else from splitkernels; every other layer may import it.
One module per section of docs/FORMATS.md: :mod:`.bitstream` (1), :mod:`.weights` (2),
:mod:`.activations` (3); :mod:`.dtypes` holds what they share. The wire frame (4) lives with
the codec (:mod:`splitkernels.codec.frame`).
"""
from .activations import (
    CODEC_BITS,
    EncodedBuffers,
    empty_encode_buffers,
    estimated_sq_error,
    round_down_fp16,
    round_up_fp16,
    step_for,
)
from .bitstream import BIT_STREAM_WIDTHS, pack_bits, packed_nbytes, unpack_bits
from .dtypes import CODE_DTYPE, DTYPE_CODE, FLOAT_DTYPES, dtype_code, exact_div, raw_width
from .weights import (
    WEIGHT_BITS,
    WEIGHT_FORMAT_VERSION,
    WEIGHT_META_KEYS,
    WEIGHT_TENSOR_KEYS,
    QuantizedWeight,
    check_weight_layout,
    dequantize_weight,
    pack_weight_codes,
    packed_words,
    unpack_weight_codes,
)

__all__ = [
    "BIT_STREAM_WIDTHS", "CODEC_BITS", "CODE_DTYPE", "DTYPE_CODE", "FLOAT_DTYPES", "WEIGHT_BITS",
    "WEIGHT_FORMAT_VERSION", "WEIGHT_META_KEYS", "WEIGHT_TENSOR_KEYS", "EncodedBuffers", "QuantizedWeight",
    "check_weight_layout", "dequantize_weight", "dtype_code", "empty_encode_buffers", "estimated_sq_error",
    "exact_div", "pack_bits", "pack_weight_codes", "packed_nbytes", "packed_words", "raw_width",
    "round_down_fp16", "round_up_fp16", "step_for", "unpack_bits", "unpack_weight_codes",
]
