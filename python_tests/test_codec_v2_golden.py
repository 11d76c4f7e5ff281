"""Golden vector of codec v2 (docs/FORMATS.md §5.4): pins the quantiser, the rANS stream and the frame."""
from __future__ import annotations

import numpy as np
import torch

from splitkernels.codec import CodecConfigV2, decode, encode, frame_v2, from_bytes, rans

CONFIG = CodecConfigV2(center=(0.0, 1.0, -2.0, 100.0), step=(0.5, 0.25, 1.0, 2.0), kmax=2,
                       freqs=(1024, 3072, 8192, 3072, 1023, 1), raw_limit=2)
X = torch.tensor([[0.3, 1.2, -5.5, 101.0], [-0.75, 0.0, 7.0, 96.0], [9.0, -9.0, 9.0, 90.0]], dtype=torch.float16)
FRAME = bytes.fromhex("534b5451020103030480c500000047804880c88048a055ff331d01ff93ff3f000077605098")


def test_golden_config_fingerprint_and_crc_seed():
    assert CONFIG.fingerprint.startswith("b2a9227c")
    assert CONFIG.crc_seed == 0x8FA876CD


def test_golden_symbols_and_frame():
    enc = encode(X, CONFIG)
    # 0.3/0.5 -> 1; (1.2-1)/0.25 -> 1; -3.5 escapes; 0.5 rounds half to even -> 0; -1.5 -> -2; ...
    assert enc.symbols[:2].tolist() == [[3, 3, 5, 2], [0, 5, 5, 0]]
    assert enc.raw.tolist() == [False, False, True]
    assert enc.escapes.tolist() == [-5.5, 0.0, 7.0]
    assert enc.to_bytes() == FRAME
    assert decode(from_bytes(FRAME, config=CONFIG)).tolist() == [
        [0.5, 1.25, -5.5, 100.0], [-1.0, 0.0, 7.0, 96.0], [9.0, -9.0, 9.0, 90.0]]


def test_golden_rans_stream_reference_and_default_coder():
    sym = np.array([3, 3, 5, 2, 0, 5, 5, 0], dtype=np.uint8)
    stream = FRAME[23:-4]  # after 6 header, 2 varint, 1 bitmap, 6 escape and 8 raw bytes
    assert rans.encode_reference(sym, CONFIG.freqs) == stream
    assert rans.encode(sym, CONFIG.freqs) == stream
    assert rans.decode_reference(stream, CONFIG.freqs, 8).tolist() == sym.tolist()


# Channel classes (docs/FORMATS.md §5.1, §5.3): channels 0 and 3 code with table 0, 1 and 2 with table 1.
CLASS_CONFIG = CodecConfigV2(center=CONFIG.center, step=CONFIG.step, kmax=2, freqs=CONFIG.freqs, raw_limit=2,
                             class_freqs=(CONFIG.freqs, (2048, 2048, 4096, 2048, 2048, 4096)), channel_class=(0, 1, 1, 0))
CLASS_FRAME = bytes.fromhex("534b5451020103030480c500000047804880c88048a055783016000070b8ffe769")


def test_golden_class_tables_frame_and_stream():
    assert CLASS_CONFIG.crc_seed == 0x72EAFC00
    assert CLASS_CONFIG.canonical_bytes()[0] == 3
    assert encode(X, CLASS_CONFIG).to_bytes() == CLASS_FRAME
    sym = np.array([3, 3, 5, 2, 0, 5, 5, 0], dtype=np.uint8)
    stream = CLASS_FRAME[23:-4]
    assert rans.encode_reference(sym, CLASS_CONFIG.rans_tables) == stream
    assert rans.encode(sym, CLASS_CONFIG.rans_tables) == stream
    assert rans.decode_reference(stream, CLASS_CONFIG.rans_tables, 8).tolist() == sym.tolist()
    assert decode(from_bytes(CLASS_FRAME, config=CLASS_CONFIG)).tolist() == decode(from_bytes(FRAME, config=CONFIG)).tolist()


# Position shifts (docs/FORMATS.md §5.2, §5.4): position 1 codes with the step / 4 (shift 2).
SHIFT_CONFIG = CodecConfigV2(center=CONFIG.center, step=CONFIG.step, kmax=2, freqs=CONFIG.freqs, raw_limit=2, position_shift=(0, 2))
SHIFT_FRAME = bytes.fromhex("534b545102810300030480c500000047804880c88048a055a8fff36300ff1bff3f0000aecc606c")


def test_golden_position_shift_frame():
    assert SHIFT_CONFIG.crc_seed == 0xA9022FFB and SHIFT_CONFIG.canonical_bytes()[0] == 4
    enc = encode(X, SHIFT_CONFIG, start=0)
    # Token 1, channel 0: v = -1.5, fine = rint(-1.5 * 4) = -6 = coarse -1 (symbol 1) * 4 + residual -2.
    assert enc.symbols[:2].tolist() == [[3, 3, 5, 2], [1, 5, 5, 0]]
    assert enc.residuals.tolist() == [[0, 0, 0, 0], [-2, 0, 0, 0]]
    assert enc.to_bytes() == SHIFT_FRAME
    assert SHIFT_FRAME[24] == 0xA8  # the residual section: fields 0, 2, 2, 2 of 2 bits, LSB first
    assert decode(from_bytes(SHIFT_FRAME, config=SHIFT_CONFIG)).tolist() == [
        [0.5, 1.25, -5.5, 100.0], [-0.75, 0.0, 7.0, 96.0], [9.0, -9.0, 9.0, 90.0]]
    assert encode(X, SHIFT_CONFIG, start=2).to_bytes()[5] & 0x80 == 0  # no shifted row: plain layout


# The token form (docs/FORMATS.md §5.4.1): every one-token frame. Tag 0xA1 (fp16, rANS), escape count,
# the escape, the stream of test_golden_rans_stream's first four symbols, CRC.
TOKEN_FRAME = bytes.fromhex("a10180c500b80f00ff3f8cf2ed2b")
RAW_TOKEN_FRAME = bytes.fromhex("a500804880c88048a055588a2960")  # tag 0xA5 (raw bit): no escapes, 4 fp16 values, CRC
SHIFT_TOKEN_FRAME = bytes.fromhex("a9010200000047a8ff8b0600ff3f000031275efa")  # tag 0xA9 (shifted bit), start 1, ...


def test_golden_token_form():
    assert encode(X[:1], CONFIG).to_bytes() == TOKEN_FRAME
    assert TOKEN_FRAME[4:10] == rans.encode_reference(np.array([3, 3, 5, 2], dtype=np.uint8), CONFIG.freqs)
    assert decode(from_bytes(TOKEN_FRAME, config=CONFIG)).tolist() == [[0.5, 1.25, -5.5, 100.0]]
    assert encode(X[2:3], CONFIG).to_bytes() == RAW_TOKEN_FRAME  # three escapes > raw_limit: travels raw
    assert decode(from_bytes(RAW_TOKEN_FRAME, config=CONFIG)).tolist() == [[9.0, -9.0, 9.0, 90.0]]
    enc = encode(X[1:2], SHIFT_CONFIG, start=1)
    assert enc.symbols.tolist() == [[1, 5, 5, 0]] and enc.residuals.tolist() == [[-2, 0, 0, 0]]
    assert enc.to_bytes() == SHIFT_TOKEN_FRAME
    assert SHIFT_TOKEN_FRAME[7] == 0xA8  # after tag, start, escape count and the two escapes: the residual section
    assert decode(from_bytes(SHIFT_TOKEN_FRAME, config=SHIFT_CONFIG)).tolist() == [[-0.75, 0.0, 7.0, 96.0]]


# The four-lane token form (docs/FORMATS.md §5.4.1, coder 6): what a writer sends from 2048 values, here
# forced on the golden token. Tag 0x81 (marker 0b100, fp16), the escape, four states of one symbol each
# (no words), CRC; with the step scale 4, tag 0xE1 (marker 0b111) and the scale byte.
FOUR_LANE_TOKEN_FRAME = bytes.fromhex("810180c50074050000740500ff3f004000100200edf14450")
SCALED_FOUR_LANE_TOKEN_FRAME = bytes.fromhex("e1040000100200001002000000100000100200e8e01852")


def test_golden_four_lane_token_form():
    for config, frame, values in ((CONFIG, FOUR_LANE_TOKEN_FRAME, [[0.5, 1.25, -5.5, 100.0]]),
                                  (CONFIG.scaled(4), SCALED_FOUR_LANE_TOKEN_FRAME, [[0.0, 1.0, -6.0, 100.0]])):
        enc = encode(X[:1], config)
        stream = rans.encode_reference(enc.symbols.numpy().ravel(), config.freqs, n_lanes=rans.LONG_LANES)
        assert frame_v2.assemble_frame(config, frame_v2.CODER_RANS_FOUR, 1, np.zeros(1, dtype=bool), enc.escapes,
                                       enc.raw_values, stream) == frame
        assert stream in frame and len(stream) == 4 * rans.LONG_LANES
        assert rans.decode_reference(stream, config.freqs, 4, n_lanes=rans.LONG_LANES).tolist() == enc.symbols[0].tolist()
        assert decode(from_bytes(frame, config=CONFIG)).tolist() == values
