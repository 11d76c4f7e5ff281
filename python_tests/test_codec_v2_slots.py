"""The slot coder of long codec v2 frames (coder 5, docs/FORMATS.md §5.9): its parameters and
costs, the reference against the C++ coder on each of its instruction sets (full groups of 8 rows
and short ones), a hand-computed stream, golden bytes, corruption, non-canonical and forged
streams, and frames that carry it (general and fused paths)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from splitkernels.codec import FrameError, decode, encode, frame_v2, from_bytes, rans, slots, wire_v2

from isa_switch import check_unknown_isa_refused, isa_fixture
from v2_frames import bit_flips, forged_long_header, frame_coder, fuzz_long_frame, long_frame_config, long_input

slots_isa = isa_fixture("slots", "slots_isa", "the C++ slot coder")


def params(rng, d: int, nsym: int) -> tuple[np.ndarray, np.ndarray]:
    """Random valid ``(starts, widths)``: every window inside 0..255, starting in the table."""
    w = rng.integers(1, slots.MAX_WIDTH + 1, d)
    a = rng.integers(0, nsym, d)
    a = np.where(a + (1 << w) - 1 <= 256, a, 0)
    return a.astype(np.uint8), w.astype(np.uint8)


def rows_around(rng, rows: int, starts: np.ndarray, widths: np.ndarray, nsym: int) -> np.ndarray:
    """Symbols ``[rows, d]`` mostly inside each channel's window, some just outside it (near
    escapes) and some far away (far escapes), clipped to the table."""
    d = starts.shape[0]
    mid = starts.astype(np.int64) + ((1 << widths.astype(np.int64)) - 1) // 2
    v = np.round(rng.laplace(0.0, 1.0 + widths, (rows, d))).astype(np.int64)
    sym = np.clip(mid + v, 0, nsym - 1)
    far = rng.random((rows, d)) < 0.03
    sym[far] = rng.integers(0, nsym, int(far.sum()))
    return sym.astype(np.uint8)


# ---------------------------------------------------------------- parameters and costs


def test_table_params_pick_the_cheapest_width_and_window():
    # 3 symbols hold almost everything: w = 2 (a window of 3) beats w = 1 (the two side symbols
    # escape at 5 bits) and w = 3; a peakier table takes w = 1.
    narrow = (1, 1, 1000, 4000, 1000, 1, 1, 1)
    assert slots.table_params(narrow) == (2, 2)
    assert slots.table_params((1, 1, 100, 4000, 100, 1, 1, 1)) == (3, 1)
    costs = {w: int((np.array(narrow) * slots.code_bits(8, slots.window_start(np.array(narrow), (1 << w) - 1), w)).sum())
             for w in range(1, 9)}
    assert min(costs, key=lambda w: (costs[w], w)) == 2
    # A flat table of 16 symbols: a window of 15 and one near escape.
    assert slots.table_params((10,) * 16) == (0, 4)
    # A table of 2 symbols: a window of 1 would escape the other symbol at 5 bits; 2 bits for both.
    assert slots.table_params((5, 7)) == (0, 2)


def test_code_bits_and_distances():
    # Window [3, 6) (a = 3, w = 2): 2 bits inside; e = 2(s - 6) above, 2(2 - s) + 1 below.
    assert slots.distance([6, 7, 2, 1], 3, 2).tolist() == [0, 2, 1, 3]
    assert slots.code_bits(40, 3, 2)[[3, 5, 6, 2, 13, 14, 0]].tolist() == [2, 2, 6, 6, 6, 14, 6]


def test_expected_bits_match_the_stream():
    rng = np.random.default_rng(3)
    tables = [tuple(rans.build_freqs(np.exp(-np.abs(np.arange(60) - 30) / w))) for w in (1.0, 4.0)]
    table_of = [0, 1, 1, 0, 1] * 13
    starts, widths = slots.channel_params(tables, table_of)
    p = [np.asarray(t, dtype=np.float64) / rans.M for t in tables]
    sym = np.stack([rng.choice(60, size=3000, p=p[i]) for i in table_of], axis=1).astype(np.uint8)
    measured = 8 * len(slots.encode(sym, None, starts, widths, 60)) / sym.size
    want = sum(slots.expected_bits([tables[i]]) for i in table_of) / len(table_of)
    assert abs(measured - want) < 0.02


# ---------------------------------------------------------------- the coder


def test_hand_computed_stream():
    # Channel 0: a = 2, w = 2 (W = 3); channel 1: a = 0, w = 1 (W = 1); 12 symbols. Token [3, 11]:
    # v0 = 1; channel 1 escapes (v1 = 1) at e = 2 * (11 - 1) = 20, a far symbol. Slot bits (a
    # group of one token): v0 bit 0 (1), v0 bit 1 (0), v1 bit 0 (1) = 0b101.
    starts, widths = np.array([2, 0], dtype=np.uint8), np.array([2, 1], dtype=np.uint8)
    sym = np.array([[3, 11]], dtype=np.uint8)
    want = bytes.fromhex("01000000" "01000000" "05" "0f" "0b")
    assert slots.encode_reference(sym, starts, widths, 12) == want
    assert slots.encode(sym, None, starts, widths, 12) == want
    assert slots.decode_reference(want, 1, starts, widths, 12, 2).tolist() == [[3, 11]]


@pytest.mark.parametrize("rows,d,nsym", [(1, 1, 2), (3, 5, 40), (8, 63, 20), (9, 64, 256), (16, 65, 9),
                                         (17, 130, 170), (7, 576, 182), (24, 4096, 34), (40, 64, 6)])
def test_reference_round_trip_and_native_bytes(slots_isa, rows, d, nsym):
    rng = np.random.default_rng(rows * 1000 + d + nsym)
    starts, widths = params(rng, d, nsym)
    sym = rows_around(rng, rows, starts, widths, nsym)
    data = slots.encode_reference(sym, starts, widths, nsym)
    assert rows <= slots.max_rows(len(data), slots.row_bits(widths, d))
    assert np.array_equal(slots.decode_reference(data, rows, starts, widths, nsym, d), sym)
    assert slots.encode(sym, None, starts, widths, nsym) == data
    out, count = slots.decode(data, np.zeros(rows, dtype=bool), starts, widths, nsym, d, count_of=nsym - 1)
    assert np.array_equal(out, sym) and count == int((sym == nsym - 1).sum())


@pytest.mark.parametrize("nsym", [60, 256])
def test_roomy_windows_round_trip_and_still_refuse_non_canonical_far_bytes(slots_isa, nsym):
    # Every window at least 8 symbols from both ends of the table: the decoder skips its range
    # checks of in-window and near symbols, not its checks of far bytes.
    rng = np.random.default_rng(11)
    d = 200
    starts = rng.integers(8, 30 if nsym == 60 else 230, d).astype(np.uint8)
    widths = rng.integers(1, 4, d).astype(np.uint8)
    sym = rows_around(rng, 21, starts, widths, nsym)
    data = slots.encode_reference(sym, starts, widths, nsym)
    assert slots.encode(sym, None, starts, widths, nsym) == data
    assert np.array_equal(slots.decode(data, np.zeros(21, dtype=bool), starts, widths, nsym, d)[0], sym)
    n_xx = int(np.frombuffer(data[4:8], "<u4")[0])
    s64, a64, w64 = sym.astype(np.int64), starts.astype(np.int64), widths.astype(np.int64)
    outside = (s64 < a64) | (s64 >= a64 + (1 << w64) - 1)
    far = outside & (slots.distance(s64, a64, w64) >= slots.FAR)
    assert n_xx == int(far.sum()) > 0
    first = int(np.argwhere(far)[0][1])  # the channel of the first far byte (row-major order)
    a, top = int(starts[first]), int(starts[first]) + (1 << int(widths[first])) - 1
    # Inside its window, near it below and above (distance < 15), outside the table.
    for byte in (a, a - 1, a - 7, top, top + 7, *([nsym] if nsym < 256 else [])):
        forged = data[:-n_xx] + bytes([byte]) + data[len(data) - n_xx + 1 :]
        with pytest.raises(slots.SlotsError):
            slots.decode(forged, np.zeros(21, dtype=bool), starts, widths, nsym, d)
        with pytest.raises(slots.SlotsError):
            slots.decode_reference(forged, 21, starts, widths, nsym, d)


def test_raw_rows_are_skipped_and_decode_as_zero(slots_isa):
    rng = np.random.default_rng(5)
    starts, widths = params(rng, 70, 50)
    sym = rows_around(rng, 12, starts, widths, 50)
    raw = np.array([0, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    data = slots.encode(sym, raw, starts, widths, 50)
    assert data == slots.encode_reference(sym[~raw], starts, widths, 50)
    out, _ = slots.decode(data, raw, starts, widths, 50, 70)
    assert np.array_equal(out[~raw], sym[~raw]) and not out[raw].any()


@pytest.mark.parametrize("w", [1, 3, 8])
def test_every_symbol_escaped_and_every_symbol_inside(slots_isa, w):
    rows, d, nsym = 11, 100, 256
    starts, widths = np.zeros(d, dtype=np.uint8), np.full(d, w, dtype=np.uint8)
    far = np.full((rows, d), 255, dtype=np.uint8)  # outside every window, >= 8 symbols beyond it
    data = slots.encode(far, None, starts, widths, nsym)
    assert data == slots.encode_reference(far, starts, widths, nsym)
    if w < 8:
        n = rows * d
        assert np.frombuffer(data[:8], "<u4").tolist() == [n, n] and data.endswith(far.tobytes())
    assert np.array_equal(slots.decode(data, np.zeros(rows, dtype=bool), starts, widths, nsym, d)[0], far)
    inside = np.zeros((rows, d), dtype=np.uint8)  # w bits each, nothing else
    data = slots.encode(inside, None, starts, widths, nsym)
    assert data == slots.encode_reference(inside, starts, widths, nsym)
    assert len(data) == 8 + (rows * d * w + 7) // 8
    assert np.array_equal(slots.decode(data, np.zeros(rows, dtype=bool), starts, widths, nsym, d)[0], inside)


def test_parameters_changed_in_place_are_seen(slots_isa):
    # The C++ coder keeps its last layout while the parameters stay the same: the same arrays,
    # changed in place between calls, must give a new layout (one channel's window and width here).
    rng = np.random.default_rng(14)
    d, nsym = 130, 64
    starts, widths = np.full(d, 20, dtype=np.uint8), np.full(d, 3, dtype=np.uint8)
    sym = rows_around(rng, 12, starts, widths, nsym)
    no_raw = np.zeros(12, dtype=bool)
    for a, w in ((20, 3), (18, 4), (18, 4), (20, 3)):
        starts[77], widths[77] = a, w
        data = slots.encode(sym, None, starts, widths, nsym)
        assert data == slots.encode_reference(sym, starts, widths, nsym)
        assert np.array_equal(slots.decode(data, no_raw, starts, widths, nsym, d)[0], sym)


def test_one_parameter_entry_serves_every_channel(slots_isa):
    rng = np.random.default_rng(6)
    start, width = np.array([14], dtype=np.uint8), np.array([4], dtype=np.uint8)
    sym = rows_around(rng, 10, np.full(77, 14, np.uint8), np.full(77, 4, np.uint8), 40)
    data = slots.encode(sym, None, start, width, 40)
    assert data == slots.encode(sym, None, np.full(77, 14, np.uint8), np.full(77, 4, np.uint8), 40)
    assert np.array_equal(slots.decode(data, np.zeros(10, dtype=bool), start, width, 40, 77)[0], sym)


# Golden stream (docs/FORMATS.md §5.9): 10 rows (a full group and a short one of 2) of 70 channels,
# 24 symbols, channel i with a = 3 + i % 4 and w = 1 + i % 3, symbols 2 + (5 * n) % 13 (n = 70 *
# row + i), and 23 at every 29th symbol: 514 escapes, 60 of them far.
def golden_inputs():
    i = np.arange(70)
    starts, widths = (3 + i % 4).astype(np.uint8), (1 + i % 3).astype(np.uint8)
    n = np.arange(700).reshape(10, 70)
    sym = (2 + (5 * n) % 13).astype(np.uint8)
    sym[n % 29 == 0] = 23
    return sym, starts, widths


GOLDEN_STREAM = bytes.fromhex(
    "020200003c000000fff5f355330fffaf9faf9f7ffdd7cf7efefeefbf7fbf7fff7ffffffaf9f8fffdfcd7cec3fffefeab"
    "671ffffdfb55330ffbaf9faf9f7ffd7fff7fffffefbf7ff5f3f07ffffffaf9f8fffdfcd5ccc3ffebe7ab671ffff5f35f"
    "7ffffbaf9faf9f7fdf7fff7efefeeffffff5f3f07fffffaab9a7fffdfdd5ccc3feebe7ab671fff5f3f5f3ffffbaf9ffd"
    "fcfcdfffff1bffbe6a77fffffdffffbf71c4eb7ff7ffdfab7ff31b57fcfff7ffffbffa37bf3d0f306640a6c1a32f0120"
    "56c06fcaf327128062856cc1f32f123862f845244138eaf81e3040a441a8f50e30067fa641aff501306640f6271f8062"
    "856cc1f322812386efc1452284238ee7f14f2441ef006340671af45aff01306640a6c1a32f012056cfa63c7f2201281e"
    "5cf44238e2781e5f441284a3fe1e3040a441a8f50e300f3cfa120062056ccaf32f128062856cc1f3228123f6c81e5ca4"
    "8e1e3040f41a845aef006340671af45aff01306640a6c1a32f81fcc1f322812386ecc1f52284238ee7f145244138fae8"
    "01631af45a1f006306f4a6c1a32f012056c0a63cff27128062856cc1f384238ef71e5f441284a38e1e30f0a441a8f50e"
    "300674a641fff5170e170d0e170e170c170e0d0d170e170e170c0e0d170e170d170e170c170e0d170e17170c0e170d0e"
    "170e170e170e0d170e0d170e170e170c0e170d")
GOLDEN_SHA256 = "a1261ddd6b3b869a3cc61cf14efcebfb56a1767211de41c769e1fc9f66943f55"


def test_golden_stream(slots_isa):
    sym, starts, widths = golden_inputs()
    assert hashlib.sha256(GOLDEN_STREAM).hexdigest() == GOLDEN_SHA256 and len(GOLDEN_STREAM) == 499
    assert slots.encode_reference(sym, starts, widths, 24) == GOLDEN_STREAM
    assert slots.encode(sym, None, starts, widths, 24) == GOLDEN_STREAM
    assert np.array_equal(slots.decode(GOLDEN_STREAM, np.zeros(10, dtype=bool), starts, widths, 24, 70)[0], sym)


def _rejects_corruption(dec) -> None:
    rng = np.random.default_rng(7)
    rows, d, nsym = 12, 90, 40
    starts, widths = params(rng, d, nsym)
    sym = rows_around(rng, rows, starts, widths, nsym)
    data = slots.encode_reference(sym, starts, widths, nsym)
    for bad in (data[:-2], data[: len(data) // 2], data[:8], data[:7], data + b"\0\0", data[:-1]):
        with pytest.raises(slots.SlotsError):
            dec(bad, rows, starts, widths, nsym, d)
    for wrong in (rows - 1, rows + 1):
        with pytest.raises(slots.SlotsError):
            dec(data, wrong, starts, widths, nsym, d)
    with pytest.raises(slots.SlotsError):
        dec(data, rows, starts, np.where(widths > 1, widths - 1, 2).astype(np.uint8), nsym, d)
    caught = 0
    for bad in bit_flips(data, 200, seed=3):
        try:
            out = dec(bad, rows, starts, widths, nsym, d)
        except slots.SlotsError:
            caught += 1
            continue
        assert out.shape == (rows, d) and int(out.max()) < nsym
    assert caught > 40  # a flipped escape bit or count changes the escape tally


def test_reference_rejects_corruption():
    _rejects_corruption(slots.decode_reference)


def test_native_rejects_corruption(slots_isa):
    _rejects_corruption(lambda data, rows, *a: slots.decode(data, np.zeros(rows, dtype=bool), *a)[0])


def test_native_decoder_never_reads_past_a_truncated_stream(slots_isa):
    rng = np.random.default_rng(8)
    starts, widths = params(rng, 300, 60)
    sym = rows_around(rng, 50, starts, widths, 60)
    data = slots.encode(sym, None, starts, widths, 60)
    for cut in range(1, 200, 3):
        with pytest.raises(slots.SlotsError):
            slots.decode(data[:-cut], np.zeros(50, dtype=bool), starts, widths, 60, 300)


@pytest.mark.parametrize("roomy", [False, True])
def test_rows_with_more_escapes_than_the_head_are_refused(slots_isa, roomy):
    # Every slot escapes but the head admits only a few escapes (the stream cut to match): the
    # decoders check a row's escape counts at the row's end, having read past the escapes' end.
    rows, d, nsym = 9, 300, 40
    starts, widths = np.full(d, 10 if roomy else 0, dtype=np.uint8), np.full(d, 2, dtype=np.uint8)
    sym = np.full((rows, d), 30 if roomy else 39, dtype=np.uint8)  # far above every window
    data = slots.encode(sym, None, starts, widths, nsym)
    slot_bytes = (rows * d * 2 + 7) // 8
    for n_x, n_xx in ((0, 0), (3, 1), (d + 1, 2), (rows * d - 1, rows * d - 1)):
        forged = (np.array([n_x, n_xx], "<u4").tobytes() + data[8 : 8 + slot_bytes]
                  + bytes([0xFF] * ((n_x + 1) // 2 - (n_x % 2)) + [0x0F] * (n_x % 2)) + bytes([30] * n_xx))
        for dec in (lambda b: slots.decode_reference(b, rows, starts, widths, nsym, d),
                    lambda b: slots.decode(b, np.zeros(rows, dtype=bool), starts, widths, nsym, d)[0]):
            with pytest.raises(slots.SlotsError):
                dec(forged)


def test_non_canonical_and_out_of_table_streams_are_refused(slots_isa):
    # 16 channels, a = 8, w = 2 (window 8..10), 24 symbols: every symbol 23 is far (e = 2 * 12).
    d = 16
    starts, widths = np.full(d, 8, dtype=np.uint8), np.full(d, 2, dtype=np.uint8)
    sym = np.full((9, d), 23, dtype=np.uint8)
    data = slots.encode_reference(sym, starts, widths, 24)
    decoders = (lambda b: slots.decode_reference(b, 9, starts, widths, 24, d),
                lambda b: slots.decode(b, np.zeros(9, dtype=bool), starts, widths, 24, d)[0])
    for byte in (9, 12, 3, 24):  # inside the window, near it (e < 15) above and below, outside the table
        for dec in decoders:
            with pytest.raises(slots.SlotsError):
                dec(data[:-1] + bytes([byte]))
    # A near distance naming a symbol outside the table: window 20..22 of 24 symbols, e = 4 -> 25.
    high = np.full(d, 20, dtype=np.uint8)
    near = slots.encode_reference(np.full((9, d), 23, dtype=np.uint8), high, widths, 24)
    nib_at = 8 + (9 * d * 2 + 7) // 8
    forged = near[:nib_at] + bytes([0x44]) + near[nib_at + 1 :]
    for dec in (lambda b: slots.decode_reference(b, 9, high, widths, 24, d),
                lambda b: slots.decode(b, np.zeros(9, dtype=bool), high, widths, 24, d)[0]):
        with pytest.raises(slots.SlotsError):
            dec(forged)
    # A padding nibble set (an odd escape count).
    one = slots.encode_reference(np.array([[12, 9]], dtype=np.uint8), np.array([8, 8], np.uint8),
                                 np.array([2, 2], np.uint8), 24)
    assert np.frombuffer(one[:8], "<u4").tolist() == [1, 0]
    for dec in (lambda b: slots.decode_reference(b, 1, [8, 8], [2, 2], 24, 2),
                lambda b: slots.decode(b, np.zeros(1, dtype=bool), [8, 8], [2, 2], 24, 2)[0]):
        assert dec(one).tolist() == [[12, 9]]
        with pytest.raises(slots.SlotsError):
            dec(one[:-1] + bytes([one[-1] | 0xF0]))


def test_mutated_streams_are_refused_or_canonical(slots_isa):
    # Flipped bits, cuts and extra bytes: the decoder raises SlotsError, or what it accepts is the
    # one stream of the symbols it returns (it re-encodes to the same bytes).
    rng = np.random.default_rng(12)
    refused = 0
    for _ in range(300):
        nsym, d, rows = int(rng.integers(2, 257)), int(rng.integers(1, 150)), int(rng.integers(0, 20))
        starts, widths = params(rng, d, nsym)
        data = bytearray(slots.encode(rows_around(rng, rows, starts, widths, nsym), None, starts, widths, nsym))
        if data and rng.random() < 0.7:
            data[int(rng.integers(0, len(data)))] ^= 1 << int(rng.integers(0, 8))
        elif rng.random() < 0.5:
            data = data[: int(rng.integers(0, len(data) + 1))]
        else:
            data += bytes([int(rng.integers(0, 256))])
        try:
            out, _ = slots.decode(bytes(data), np.zeros(rows, dtype=bool), starts, widths, nsym, d)
        except slots.SlotsError:
            refused += 1
            continue
        assert slots.encode(out, None, starts, widths, nsym) == bytes(data)
    assert refused > 150


def test_forged_counts_are_refused_before_allocating(slots_isa):
    starts, widths = np.zeros(1, dtype=np.uint8), np.ones(1, dtype=np.uint8)
    with pytest.raises(slots.SlotsError, match="cannot fit"):
        slots.decode(b"\0" * 200, np.zeros(1 << 20, dtype=bool), starts, widths, 6, 4096)
    with pytest.raises(slots.SlotsError):
        slots.decode(b"\xff\xff\xff\x7f" + b"\0" * 100, np.zeros(4, dtype=bool), starts, widths, 6, 8)
    # The C++ entry points refuse a negative row count in one line (no rows decode as nothing).
    buf, out = np.zeros(16, dtype=np.uint8), np.zeros(64, dtype=np.uint8)
    err, _ = slots._C.slots_decode(buf.ctypes.data, 16, -1, 1, 0, starts.ctypes.data, widths.ctypes.data, 6, out.ctypes.data)
    assert "T must be >= 0" in err
    with pytest.raises(ValueError, match="out of range"):
        slots._C.slots_encode(out.ctypes.data, -1, 1, 0, starts.ctypes.data, widths.ctypes.data, 6, out.ctypes.data, 64)


def test_bad_symbols_and_parameters_are_refused():
    starts, widths = np.array([2], dtype=np.uint8), np.array([2], dtype=np.uint8)
    sym = np.zeros((70, 1000), dtype=np.uint8)
    sym[-1, -3] = 6  # one past the alphabet
    with pytest.raises(ValueError, match="outside the table of 6 symbols"):
        slots.encode_reference(sym, starts, widths, 6)
    with pytest.raises(ValueError, match="outside the table of 6 symbols"):
        slots.encode(sym, None, starts, widths, 6)
    for a, w in ((2, 0), (2, 9), (6, 1), (250, 3)):  # width out of range, start outside the table, past 255
        with pytest.raises(ValueError, match="out of range"):
            slots.encode(sym[:2], None, np.array([a], dtype=np.uint8), np.array([w], dtype=np.uint8), 6 if a < 250 else 256)
    with pytest.raises(ValueError, match="1 or d = 1000 entries"):
        slots.encode(sym[:2], None, np.zeros(3, dtype=np.uint8), np.ones(3, dtype=np.uint8), 6)


@pytest.mark.skipif(not slots.has_native(), reason="C++ extension not built (pip install . builds it)")
def test_unknown_instruction_set_is_refused_and_changes_nothing():
    check_unknown_isa_refused("slots")


# ---------------------------------------------------------------- frames


@pytest.fixture(scope="module")
def cfg():
    return long_frame_config()


def test_slot_frames_on_request(cfg, slots_isa):
    x = long_input()
    enc = encode(x, cfg)
    assert frame_v2.choose_coder(x.shape[0], 64, cfg) != frame_v2.CODER_SLOTS
    assert slots.vectorised() == (slots_isa == "avx512")
    data = enc.to_bytes("slots")
    assert frame_coder(data) == frame_v2.CODER_SLOTS and wire_v2.encode_frame_v2(x, cfg, "slots") == data
    want = decode(enc)
    assert torch.equal(decode(from_bytes(data, config=cfg)), want)
    assert torch.equal(wire_v2.decode_frame_v2(data, cfg), want)
    # Fixed-width slots: no fewer bytes than the Rice codes, no more than the nibble coder's.
    assert len(enc.to_bytes("rice")) < len(data) <= len(enc.to_bytes("nibble"))


def test_short_and_one_token_frames(cfg):
    small = long_input(7)
    data = encode(small, cfg).to_bytes("slots")
    assert frame_coder(data) == frame_v2.CODER_SLOTS
    assert torch.equal(decode(from_bytes(data, config=cfg)), decode(encode(small, cfg)))
    assert torch.equal(wire_v2.decode_frame_v2(data, cfg), decode(encode(small, cfg)))
    one = encode(small[:1], cfg)
    assert one.to_bytes("slots") == one.to_bytes("rans")  # the token form: rANS
    with pytest.raises(ValueError, match="one-token"):
        frame_v2.assemble_frame(cfg, frame_v2.CODER_SLOTS, 1, np.zeros(1, dtype=bool), torch.zeros(0).half(),
                                torch.zeros(0, 64).half(), b"")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_path_matches_the_general_path(cfg, slots_isa, dtype):
    x = long_input(300, seed=9).to(dtype)
    data = encode(x, cfg).to_bytes("slots")
    assert wire_v2.encode_frame_v2(x, cfg, "slots") == data
    assert torch.equal(wire_v2.decode_frame_v2(data, cfg), decode(from_bytes(data, config=cfg)))


def test_reference_path_gives_the_same_frames(cfg, monkeypatch):
    x = long_input(40, seed=4)
    enc = encode(x, cfg)
    data = enc.to_bytes("slots")
    monkeypatch.setattr(slots, "has_native", lambda: False)
    assert enc.to_bytes("slots") == data
    assert torch.equal(decode(from_bytes(data, config=cfg)), decode(enc))


def test_fuzz_slot_frames_raise_only_frame_error(cfg, slots_isa):
    x = long_input(seed=2)
    data = encode(x, cfg).to_bytes("slots")
    assert frame_coder(data) == frame_v2.CODER_SLOTS
    fuzz_long_frame(data, cfg, lambda b: decode(from_bytes(b, config=cfg)), x.shape)
    fuzz_long_frame(data, cfg, lambda b: wire_v2.decode_frame_v2(b, cfg), x.shape)


def test_forged_slots_header_cannot_force_large_allocations(cfg):
    with pytest.raises(FrameError, match="stream can hold"):
        from_bytes(forged_long_header(frame_v2.CODER_SLOTS, cfg), config=cfg)
