"""The 32-lane rANS layout of long codec v2 frames (coder 2, docs/FORMATS.md §5.3, §5.4): the
reference against the C++ coder on each of its instruction sets, golden bytes, corruption, and
frames that carry it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from splitkernels.codec import CodecConfigV2, FrameError, decode, encode, frame_v2, from_bytes, rans, wire_v2

from isa_switch import isa_fixture
from test_codec_v2_classes import random_classes
from v2_frames import bit_flips, forged_long_header, frame_coder, fuzz_long_frame, long_frame_config, long_input


rans_isa = isa_fixture("rans", "rans_isa", "the C++ wide rANS coder")


@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (31, 7, 2), (32, 32, 1), (33, 5, 3), (1000, 37, 4), (4133, 640, 16),
                                   (70_001, 576, 16), (70_000, 1, 1)])
def test_wide_reference_round_trip_and_native_bytes(rans_isa, n, d, k):
    rng = np.random.default_rng(n + d + k)
    ct = random_classes(rng, int(rng.integers(2, 60)), k, d)
    sym = rng.integers(0, ct.nsym, size=n).astype(np.uint8)  # any symbol, however unlikely
    data = rans.encode_reference(sym, ct, n_lanes=rans.WIDE_LANES)
    assert len(data) >= 4 * rans.WIDE_LANES
    assert np.array_equal(rans.decode_reference(data, ct, n, n_lanes=rans.WIDE_LANES), sym)
    assert rans.encode(sym, ct, n_lanes=rans.WIDE_LANES) == data
    out, count = rans.decode(data, ct, n, count_of=1, n_lanes=rans.WIDE_LANES)
    assert np.array_equal(out, sym) and count == int((sym == 1).sum())
    # The narrow layout of the same symbols differs: the lane count is part of the stream.
    assert rans.encode(sym, ct) != data


@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (2, 3, 2), (3, 3, 1), (4, 4, 2), (5, 7, 3), (2047, 2047, 16),
                                   (4099, 4096, 16), (4096, 1, 1)])
def test_four_lane_layout_native_bytes_match_the_reference(n, d, k):
    """The four-lane layout (coder 6) at any length: whole groups of four and the partial group the
    C++ encoder codes first."""
    if not rans.has_native():
        pytest.skip("C++ extension not built (pip install . builds splitkernels._C): nothing to compare with")
    rng = np.random.default_rng(10 * n + k)
    ct = random_classes(rng, int(rng.integers(2, 60)), k, d)
    sym = rng.integers(0, ct.nsym, size=n).astype(np.uint8)
    data = rans.encode_reference(sym, ct, n_lanes=rans.LONG_LANES)
    assert len(data) >= 4 * rans.LONG_LANES
    assert rans.encode(sym, ct, n_lanes=rans.LONG_LANES) == data
    assert np.array_equal(rans.decode_reference(data, ct, n, n_lanes=rans.LONG_LANES), sym)
    out, count = rans.decode(data, ct, n, count_of=2, n_lanes=rans.LONG_LANES)
    assert np.array_equal(out, sym) and count == int((sym == 2).sum())
    with pytest.raises(ValueError, match="1, 4 or 32 lanes"):
        rans.encode(sym, ct, n_lanes=8)


def test_wide_layout_is_the_narrow_coder_on_32_lanes():
    # Lane j of the wide layout codes symbols j, j + 32, ...; with one symbol per lane each state
    # is a one-symbol narrow stream's state and no word is emitted.
    freqs = (1024, 3072, 8192, 3072, 1023, 1)
    sym = np.arange(32, dtype=np.uint8) % 6
    data = rans.encode_reference(sym, freqs, n_lanes=rans.WIDE_LANES)
    assert len(data) == 4 * 32
    states = [rans.encode_reference(sym[j : j + 1], freqs)[:4] for j in range(32)]
    assert data == b"".join(states)


# Golden stream (docs/FORMATS.md §5.3): 40 symbols of the golden table on 32 lanes.
GOLDEN_FREQS = (1024, 3072, 8192, 3072, 1023, 1)
GOLDEN_SYMBOLS = np.array([3, 3, 5, 2, 0, 5, 5, 0] * 5, dtype=np.uint8)
GOLDEN_STREAM = bytes.fromhex(
    "00341d0000341d00ff3f00100020040000000001ff3f0010ff3f0010000000010074050000740500ff3f0040"
    "0010020000001000ff3f0040ff3f0040000010000074050000740500ff3f00400010020000001000ff3f0040"
    "ff3f0040000010000074050000740500ff3f00400010020000001000ff3f0040ff3f004000001000ff3fff3f"
    "ff3f")


def test_golden_wide_stream(rans_isa):
    assert rans.encode_reference(GOLDEN_SYMBOLS, GOLDEN_FREQS, n_lanes=rans.WIDE_LANES) == GOLDEN_STREAM
    assert rans.encode(GOLDEN_SYMBOLS, GOLDEN_FREQS, n_lanes=rans.WIDE_LANES) == GOLDEN_STREAM
    assert rans.decode(GOLDEN_STREAM, GOLDEN_FREQS, 40, n_lanes=rans.WIDE_LANES).tolist() == GOLDEN_SYMBOLS.tolist()


def _rejects_corruption(dec) -> None:
    rng = np.random.default_rng(7)
    ct = random_classes(rng, 20, 3, 64)
    n = 3000
    sym = rng.integers(0, 20, size=n).astype(np.uint8)
    data = rans.encode_reference(sym, ct, n_lanes=rans.WIDE_LANES)
    for bad in (data[:-2], data[: len(data) // 2], data[: 4 * 32], data + b"\0\0", data[:-1]):
        with pytest.raises(rans.RansError):
            dec(bad, ct, n, n_lanes=rans.WIDE_LANES)
    with pytest.raises(rans.RansError):
        dec(data, ct, n - 1, n_lanes=rans.WIDE_LANES)
    with pytest.raises(rans.RansError):
        dec(data, ct, n, n_lanes=None)
    flipped = 0
    for bad in bit_flips(data, 200, seed=3):
        try:
            out = dec(bad, ct, n, n_lanes=rans.WIDE_LANES)
        except rans.RansError:
            flipped += 1
            continue
        assert out.shape == (n,)
    assert flipped > 100  # the end-state check catches most corruptions by itself


def test_wide_reference_rejects_corruption():
    _rejects_corruption(rans.decode_reference)


def test_wide_native_rejects_corruption(rans_isa):
    _rejects_corruption(rans.decode)


def test_wide_native_decoder_never_reads_past_a_truncated_stream(rans_isa):
    # Truncated streams whose cut lands inside the vector loop's reach: each must fail cleanly.
    rng = np.random.default_rng(8)
    ct = random_classes(rng, 30, 4, 96)
    n = 20_000
    sym = rng.integers(0, 30, size=n).astype(np.uint8)
    data = rans.encode(sym, ct, n_lanes=rans.WIDE_LANES)
    for cut in range(1, 200, 3):
        with pytest.raises(rans.RansError):
            rans.decode(data[:-cut], ct, n, n_lanes=rans.WIDE_LANES)


# ---------------------------------------------------------------- frames


@pytest.fixture(scope="module")
def cfg() -> CodecConfigV2:
    return long_frame_config()


def test_long_frames_take_the_wide_layout_and_read_back(cfg, rans_isa):
    x = long_input()
    enc = encode(x, cfg)
    data = enc.to_bytes()
    assert frame_coder(data) == frame_v2.CODER_RANS_WIDE
    assert wire_v2.encode_frame_v2(x, cfg) == data
    want = decode(enc)
    assert torch.equal(decode(from_bytes(data, config=cfg)), want)
    assert torch.equal(wire_v2.decode_frame_v2(data, cfg), want)
    # The stream is the wide coder's; the 28 extra states are the layout's only fixed cost.
    sym = enc.symbols.numpy()[~enc.raw.numpy()]
    wide, narrow = rans.encode(sym, cfg.rans_tables, n_lanes=rans.WIDE_LANES), rans.encode(sym, cfg.rans_tables)
    assert wide in data
    assert abs(len(wide) - len(narrow) - 4 * (rans.WIDE_LANES - rans.LONG_LANES)) <= 2 * rans.WIDE_LANES


def test_one_token_frames_never_take_the_wide_layout(cfg):
    x = torch.randn(1, 64).half()
    assert frame_v2.rans_coder(1, 1 << 20) == frame_v2.CODER_RANS_FOUR
    with pytest.raises(ValueError, match="one-token"):
        frame_v2.assemble_frame(cfg, frame_v2.CODER_RANS_WIDE, 1, np.zeros(1, dtype=bool), torch.zeros(0).half(),
                                torch.zeros(0, 64).half(), b"")
    assert encode(x, cfg).to_bytes()[0] >> 5 == 0b101  # the token form


def test_fuzz_wide_frames_raise_only_frame_error(cfg, rans_isa):
    x = long_input(seed=2)
    data = encode(x, cfg).to_bytes()
    assert frame_coder(data) == frame_v2.CODER_RANS_WIDE
    fuzz_long_frame(data, cfg, lambda b: decode(from_bytes(b, config=cfg)), x.shape)


def test_forged_wide_header_cannot_force_large_allocations(cfg):
    with pytest.raises(FrameError, match="stream can hold"):
        from_bytes(forged_long_header(frame_v2.CODER_RANS_WIDE, cfg), config=cfg)


@pytest.mark.parametrize("n_lanes", [None, rans.LONG_LANES, rans.WIDE_LANES])
def test_symbols_outside_the_table_are_refused(n_lanes):
    freqs = (1024, 3072, 8192, 3072, 1023, 1)
    sym = np.zeros(70_000, dtype=np.uint8)
    sym[-3] = 6  # one past the alphabet
    for coder in (rans.encode, rans.encode_reference):
        with pytest.raises(ValueError, match="symbol 6 is outside the table of 6 symbols"):
            coder(sym, freqs, n_lanes=n_lanes)
