"""Hand-written golden vectors that pin the formats of docs/FORMATS.md.

The expected bytes below were worked out by hand from the format definitions, not produced
by the code under test. Every backend available on this machine must reproduce them.
"""
import struct
import zlib

import pytest
import torch

from splitkernels import codec, ops
from splitkernels.quant import quantize_weight

BIT_STREAM_GOLDEN = [
    # (bits, codes, expected bytes)
    (1, [1, 0, 1, 1, 0, 0, 0, 1, 1], [0x8D, 0x01]),
    (2, [3, 1, 0, 2, 1], [0x87, 0x01]),
    (3, [1, 2, 3, 4, 5], [0xD1, 0x58]),
    (4, [0xA, 0x3, 0xF], [0x3A, 0x0F]),
    (5, [31, 0, 1], [0x1F, 0x04]),
    (6, [0x3F, 0x01], [0x7F, 0x00]),
    (7, [0x55, 0x7F], [0xD5, 0x3F]),
    (8, [0x12, 0xFE], [0x12, 0xFE]),
]


@pytest.mark.parametrize("bits,codes,expected", BIT_STREAM_GOLDEN)
def test_bit_stream_golden(backend, bits, codes, expected):
    c = torch.tensor([codes], dtype=torch.uint8)
    packed = ops.pack_bits(c, bits)
    assert packed.tolist() == [expected]
    assert ops.unpack_bits(packed, bits, len(codes)).tolist() == [codes]


def _as_int32(word: int) -> int:
    return struct.unpack("<i", struct.pack("<I", word))[0]


WEIGHT_GOLDEN = [
    # (bits, codes of one row, expected int32 words)
    (2, [0, 1, 2, 3] * 4, [0xE4E4E4E4]),
    (3, list(range(8)) * 4, [0x88FAC688, 0xC688FAC6, 0xFAC688FA]),
    (4, [1, 2, 3, 4, 5, 6, 7, 8], [0x87654321]),
    (8, [1, 2, 3, 4], [0x04030201]),
]


QUANTIZE_GOLDEN = [
    # (bits, one row of weights spanning [0, 2^b - 1] so scale = 1 and zero = 0, expected words)
    (2, [0, 1, 2, 3] * 4, [0xE4E4E4E4]),
    (3, list(range(8)) * 4, [0x88FAC688, 0xC688FAC6, 0xFAC688FA]),
    (4, [0, 15, 1, 2, 3, 4, 5, 6], [0x654321F0]),
    (8, [0, 255, 1, 2], [0x0201FF00]),
]


@pytest.mark.parametrize("bits,row,words", QUANTIZE_GOLDEN)
def test_quantize_weight_golden(bits, row, words):
    w = torch.tensor([row], dtype=torch.float32)
    q = quantize_weight(w, bits, len(row))
    assert q.scale.tolist() == [[1.0]] and q.zero.tolist() == [[0.0]]
    assert q.qweight.tolist() == [[_as_int32(x) for x in words]]
    assert torch.equal(q.dequantize(), w)


@pytest.mark.parametrize("bits,codes,words", WEIGHT_GOLDEN)
def test_weight_words_golden(bits, codes, words):
    packed = ops.reference.pack_weight_codes(torch.tensor([codes], dtype=torch.uint8), bits)
    assert packed.dtype == torch.int32
    assert packed.tolist() == [[_as_int32(x) for x in words]]
    assert ops.reference.unpack_weight_codes(packed, bits, len(codes)).tolist() == [codes]


# A 2 x 4 fp16 tensor, abs threshold 10, capacity 1, widths {2}:
#   row 0 = [1, 2, 3, 100]: outlier channel 3; lo = 1.0 (0x3C00), step = 2/3 rounded up to fp16
#           = 0.6669921875 (0x3956); codes [0, 1, 3, 0] -> 0x34.
#   row 1 = [0.5] * 4: constant, lo = 0.5 (0x3800), step = 0, codes 0 -> 0x00.
GOLDEN_FRAME_BODY = bytes.fromhex(
    "534b5451" "01" "01" "00" "00"  # magic, version, dtype fp16, flags, reserved
    "02000000" "04000000" "01000000"  # T, d, total outliers
    "0202"  # bits
    "5639" "0000"  # step
    "003c" "0038"  # lo
    "0100" "0000"  # counts
    "0300"  # outlier index
    "4056"  # outlier value 100.0
    "34" "00"  # streams
)
GOLDEN_FRAME = GOLDEN_FRAME_BODY + struct.pack("<I", zlib.crc32(GOLDEN_FRAME_BODY))
GOLDEN_CONFIG = codec.CodecConfig(threshold="abs", tau=10.0, capacity=1, bit_choices=(2,), eps=1.0)
GOLDEN_X = torch.tensor([[1.0, 2.0, 3.0, 100.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float16)


def test_codec_frame_golden(backend):
    enc = codec.encode(GOLDEN_X, GOLDEN_CONFIG)
    assert enc.to_bytes() == GOLDEN_FRAME
    assert GOLDEN_FRAME[-4:] == bytes.fromhex(f"{zlib.crc32(GOLDEN_FRAME_BODY):08x}")[::-1]


def test_codec_frame_golden_decodes(backend):
    out = codec.decode(codec.from_bytes(GOLDEN_FRAME))
    expected = torch.tensor([[1.0, 1.6669921875, 3.0, 100.0], [0.5] * 4], dtype=torch.float16)
    assert torch.equal(out, expected)
