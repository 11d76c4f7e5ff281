"""The bit-plane Rice coder of long codec v2 frames (coder 4, docs/FORMATS.md §5.8): its costs, the
reference against the C++ coder on each of its instruction sets, a hand-computed stream, golden
bytes, corruption and forged counts, and frames that carry it (general and fused paths)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from splitkernels.codec import FrameError, decode, encode, frame_v2, from_bytes, planes, rans, rice, wire_v2

from isa_switch import check_unknown_isa_refused, isa_fixture
from v2_frames import bit_flips, forged_long_header, frame_coder, fuzz_long_frame, long_frame_config, long_input

planes_isa = isa_fixture("planes", "planes_isa", "the C++ bit-plane coder")


def laplace_rows(rng, rows: int, centres: np.ndarray, nsym: int, scale: float = 3.0) -> np.ndarray:
    """Two-sided geometric symbols ``[rows, d]`` around each channel's centre, clipped to the
    alphabet, with the top symbol sprinkled in (an exception for most ``k``)."""
    d = centres.shape[0]
    v = np.round(rng.laplace(0.0, scale, (rows, d))).astype(np.int64)
    sym = np.clip(centres.astype(np.int64) + v, 0, nsym - 1)
    sym[rng.random((rows, d)) < 0.01] = nsym - 1
    return sym.astype(np.uint8)


def params(rng, d: int, nsym: int, kmax: int = rice.MAX_K) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, nsym, d).astype(np.uint8), rng.integers(0, kmax + 1, d).astype(np.uint8)


# ---------------------------------------------------------------- costs


def test_tops_keep_every_plain_code_in_a_byte():
    k = np.arange(rice.MAX_K + 1)
    top = planes.tops(k)
    assert top.tolist() == [16, 15, 14, 13, 12, 7, 3, 1]
    assert ((top << k) <= 224).all() and (top >= 1).all()


def test_code_bits_match_rice_except_at_exceptions():
    freqs = (1024, 3072, 8192, 3072, 1023, 1)
    assert planes.code_bits(freqs, 2, 0).tolist() == rice.code_bits(freqs, 2, 0).tolist() == [4, 2, 1, 3, 5, 7]
    # An exception: top ones, a zero, k zero remainder bits and its byte.
    assert planes.code_bits((1,) * 40, 0, 2)[39] == 14 + 1 + 2 + 8


def test_expected_bits_match_the_stream():
    rng = np.random.default_rng(3)
    tables = [tuple(rans.build_freqs(np.exp(-np.abs(np.arange(60) - 30) / w))) for w in (1.0, 4.0)]
    table_of = [0, 1, 1, 0, 1] * 13
    centres, ks = rice.channel_params(tables, table_of)
    p = [np.asarray(t, dtype=np.float64) / rans.M for t in tables]
    sym = np.stack([rng.choice(60, size=3000, p=p[i]) for i in table_of], axis=1).astype(np.uint8)
    measured = 8 * len(planes.encode(sym, None, centres, ks, 60)) / sym.size
    want = sum(planes.expected_bits([tables[i]]) for i in table_of) / len(table_of)
    assert abs(measured - want) < 0.02


# ---------------------------------------------------------------- the coder


def test_hand_computed_stream():
    # Channel 0: centre 2, k = 0; channel 1: centre 0, k = 1. Symbols [3, 0]: u = 2 (q 2) and u = 0
    # (q 0, remainder 0). Bits: the remainder level 0 of channel 1 (0), plane 0 "q > 0" of both
    # (1, 0), plane 1 of channel 0 (1), plane 2 of channel 0 (0): 0 1 0 1 0, least significant first.
    centres, ks = np.array([2, 0], dtype=np.uint8), np.array([0, 1], dtype=np.uint8)
    sym = np.array([[3, 0]], dtype=np.uint8)
    want = bytes(4) + bytes([0b01010])
    assert planes.encode_reference(sym, centres, ks, 6) == want
    assert planes.encode(sym, None, centres, ks, 6) == want
    assert planes.decode_reference(want, 1, centres, ks, 6, 2).tolist() == [[3, 0]]


@pytest.mark.parametrize("rows,d,nsym", [(1, 1, 2), (3, 5, 40), (2, 63, 20), (4, 64, 256), (3, 65, 9),
                                         (5, 130, 170), (7, 576, 182), (2, 4096, 34), (40, 64, 6)])
def test_reference_round_trip_and_native_bytes(planes_isa, rows, d, nsym):
    rng = np.random.default_rng(rows * 1000 + d + nsym)
    centres, ks = params(rng, d, nsym)
    sym = laplace_rows(rng, rows, centres, nsym)
    data = planes.encode_reference(sym, centres, ks, nsym)
    assert rows * d <= planes.max_symbols(len(data))
    assert np.array_equal(planes.decode_reference(data, rows, centres, ks, nsym, d), sym)
    assert planes.encode(sym, None, centres, ks, nsym) == data
    out, count = planes.decode(data, np.zeros(rows, dtype=bool), centres, ks, nsym, d, count_of=nsym - 1)
    assert np.array_equal(out, sym) and count == int((sym == nsym - 1).sum())


def test_raw_rows_are_skipped_and_decode_as_zero(planes_isa):
    rng = np.random.default_rng(5)
    centres, ks = params(rng, 70, 50)
    sym = laplace_rows(rng, 6, centres, 50)
    raw = np.array([0, 1, 0, 0, 1, 1], dtype=bool)
    data = planes.encode(sym, raw, centres, ks, 50)
    assert data == planes.encode_reference(sym[~raw], centres, ks, 50)
    out, _ = planes.decode(data, raw, centres, ks, 50, 70)
    assert np.array_equal(out[~raw], sym[~raw]) and not out[raw].any()


@pytest.mark.parametrize("k", [0, 3, 5, 7])
def test_every_symbol_an_exception_and_every_symbol_the_centre(planes_isa, k):
    rows, d, nsym = 9, 100, 256
    centres, ks = np.zeros(d, dtype=np.uint8), np.full(d, k, dtype=np.uint8)
    far = np.full((rows, d), 255, dtype=np.uint8)  # u = 510, beyond every edge
    data = planes.encode(far, None, centres, ks, nsym)
    assert data == planes.encode_reference(far, centres, ks, nsym)
    assert int.from_bytes(data[:4], "little") == rows * d and data.endswith(far.tobytes())
    assert np.array_equal(planes.decode(data, np.zeros(rows, dtype=bool), centres, ks, nsym, d)[0], far)
    same = np.zeros((rows, d), dtype=np.uint8)  # k + 1 bits each
    data = planes.encode(same, None, centres, ks, nsym)
    assert data == planes.encode_reference(same, centres, ks, nsym)
    assert len(data) == 4 + (rows * d * (k + 1) + 7) // 8
    assert np.array_equal(planes.decode(data, np.zeros(rows, dtype=bool), centres, ks, nsym, d)[0], same)


def test_one_parameter_entry_serves_every_channel(planes_isa):
    rng = np.random.default_rng(6)
    centre, k = np.array([20], dtype=np.uint8), np.array([2], dtype=np.uint8)
    sym = laplace_rows(rng, 4, np.full(77, 20, dtype=np.uint8), 40)
    data = planes.encode(sym, None, centre, k, 40)
    assert data == planes.encode(sym, None, np.full(77, 20, np.uint8), np.full(77, 2, np.uint8), 40)
    assert np.array_equal(planes.decode(data, np.zeros(4, dtype=bool), centre, k, 40, 77)[0], sym)


# Golden stream (docs/FORMATS.md §5.8): 3 rows of 70 channels (two blocks), 20 symbols, channel i
# with centre 8 + i % 5 and k = i % 4, symbols 4 + (7 * n) % 9 (n = 70 * row + i), and 19 at every
# 23rd symbol (two of them exceptions: u = 2 * (19 - centre) reaches the edge where k <= 2).
def golden_inputs():
    i = np.arange(70)
    centres, ks = (8 + i % 5).astype(np.uint8), (i % 4).astype(np.uint8)
    n = np.arange(210).reshape(3, 70)
    sym = (8 + (7 * n) % 9 - 4).astype(np.uint8)
    sym[n % 23 == 0] = 19
    return sym, centres, ks


GOLDEN_STREAM = bytes.fromhex(
    "0200000066f2f9379bed1ea0075e89a496999bfb96dab93bebfdb73bcbff0fee1ffd77fac775bdf7f3a9ffbdf9f3bb6d"
    "bfc9e4f36f56f8817aa84436acf6fae6e6eea576ee53f3b73bcb9bd97ff6df7fbcbebeefb3fb67ffd79f3b93abf6db4c"
    "bec02bf440a112d54ecd58edf5cccd5d9bfb53f3dbedff66ff6477fff8beff7d5e7fcd7fdb0f1313")


def test_golden_stream(planes_isa):
    sym, centres, ks = golden_inputs()
    assert planes.encode_reference(sym, centres, ks, 20) == GOLDEN_STREAM
    assert planes.encode(sym, None, centres, ks, 20) == GOLDEN_STREAM
    assert np.array_equal(planes.decode(GOLDEN_STREAM, np.zeros(3, dtype=bool), centres, ks, 20, 70)[0], sym)


def _rejects_corruption(dec) -> None:
    rng = np.random.default_rng(7)
    rows, d, nsym = 12, 90, 40
    centres, ks = params(rng, d, nsym, kmax=3)
    sym = laplace_rows(rng, rows, centres, nsym)
    data = planes.encode_reference(sym, centres, ks, nsym)
    for bad in (data[:-2], data[: len(data) // 2], data[:4], data[:3], data + b"\0\0", data[:-1]):
        with pytest.raises(planes.PlanesError):
            dec(bad, rows, centres, ks, nsym, d)
    for wrong in (rows - 1, rows + 1):
        with pytest.raises(planes.PlanesError):
            dec(data, wrong, centres, ks, nsym, d)
    with pytest.raises(planes.PlanesError):
        dec(data, rows, centres, (ks + 1).astype(np.uint8), nsym, d)
    caught = 0
    for bad in bit_flips(data, 200, seed=3):
        try:
            out = dec(bad, rows, centres, ks, nsym, d)
        except planes.PlanesError:
            caught += 1
            continue
        assert out.shape == (rows, d) and int(out.max()) < nsym
    assert caught > 60  # a flipped quotient bit shifts every later plane


def test_reference_rejects_corruption():
    _rejects_corruption(planes.decode_reference)


def test_native_rejects_corruption(planes_isa):
    _rejects_corruption(lambda data, rows, *a: planes.decode(data, np.zeros(rows, dtype=bool), *a)[0])


def test_native_decoder_never_reads_past_a_truncated_stream(planes_isa):
    rng = np.random.default_rng(8)
    centres, ks = params(rng, 300, 60, kmax=3)
    sym = laplace_rows(rng, 50, centres, 60)
    data = planes.encode(sym, None, centres, ks, 60)
    for cut in range(1, 200, 3):
        with pytest.raises(planes.PlanesError):
            planes.decode(data[:-cut], np.zeros(50, dtype=bool), centres, ks, 60, 300)


def test_non_canonical_streams_are_refused(planes_isa):
    # Centre 2, k = 0 (top 16) over 4 channels: an exception byte naming a plain symbol or one
    # outside the table, and a quotient with more than top one bits.
    centres, ks = np.full(4, 2, dtype=np.uint8), np.zeros(4, dtype=np.uint8)
    sym = np.full((1, 4), 19, dtype=np.uint8)
    data = planes.encode_reference(sym, centres, ks, 20)
    decoders = (lambda b: planes.decode_reference(b, 1, centres, ks, 20, 4),
                lambda b: planes.decode(b, np.zeros(1, dtype=bool), centres, ks, 20, 4)[0])
    for byte in (3, 20):
        for dec in decoders:
            with pytest.raises(planes.PlanesError):
                dec(data[:-1] + bytes([byte]))
    # Channel 0's u = 2 * 17 = 34: 16 ones and no zero would be 17 planes; one more one bit each.
    bits = [1] * 4 * 16 + [1] * 4 + [0] * 4  # planes 0..16 all ones, plane 17 zeros
    forged = bytes(4) + np.packbits(np.array(bits, dtype=np.uint8), bitorder="little").tobytes()
    for dec in decoders:
        with pytest.raises(planes.PlanesError):
            dec(forged)


def test_forged_counts_are_refused_before_allocating(planes_isa):
    centres, ks = np.zeros(1, dtype=np.uint8), np.zeros(1, dtype=np.uint8)
    with pytest.raises(planes.PlanesError, match="cannot fit"):
        planes.decode(b"\0" * 200, np.zeros(1 << 20, dtype=bool), centres, ks, 6, 4096)
    with pytest.raises(planes.PlanesError):
        planes.decode(b"\xff\xff\xff\x7f" + b"\0" * 100, np.zeros(4, dtype=bool), centres, ks, 6, 8)
    # The C++ entry points refuse a negative row count in one line (no rows decode as nothing).
    buf, out = np.zeros(16, dtype=np.uint8), np.zeros(64, dtype=np.uint8)
    err, _ = planes._C.planes_decode(buf.ctypes.data, 16, -1, 1, 0, centres.ctypes.data, ks.ctypes.data, 6, out.ctypes.data)
    assert "T must be >= 0" in err
    with pytest.raises(ValueError, match="out of range"):
        planes._C.planes_encode(out.ctypes.data, -1, 1, 0, centres.ctypes.data, ks.ctypes.data, 6, out.ctypes.data, 64)


def test_bad_symbols_and_parameters_are_refused():
    centres, ks = np.array([2], dtype=np.uint8), np.array([0], dtype=np.uint8)
    sym = np.zeros((70, 1000), dtype=np.uint8)
    sym[-1, -3] = 6  # one past the alphabet
    with pytest.raises(ValueError, match="outside the table of 6 symbols"):
        planes.encode_reference(sym, centres, ks, 6)
    with pytest.raises(ValueError, match="outside the table of 6 symbols"):
        planes.encode(sym, None, centres, ks, 6)
    with pytest.raises(ValueError, match="out of range"):
        planes.encode(sym[:2], None, centres, np.array([8], dtype=np.uint8), 6)
    with pytest.raises(ValueError, match="1 or d = 1000 entries"):
        planes.encode(sym[:2], None, np.zeros(3, dtype=np.uint8), np.zeros(3, dtype=np.uint8), 6)


@pytest.mark.skipif(not planes.has_native(), reason="C++ extension not built (pip install . builds it)")
def test_unknown_instruction_set_is_refused_and_changes_nothing():
    check_unknown_isa_refused("planes")


# ---------------------------------------------------------------- frames


@pytest.fixture(scope="module")
def cfg():
    return long_frame_config()


def test_planes_frames_on_request_and_never_under_auto(cfg, planes_isa):
    x = long_input()
    enc = encode(x, cfg)
    # "auto" keeps the Rice coder: a receiver without AVX-512 VBMI2 decodes bit planes slowly.
    assert frame_v2.choose_coder(x.shape[0], 64, cfg) != frame_v2.CODER_PLANES
    assert planes.vectorised() == (planes_isa == "avx512")
    data = enc.to_bytes("planes")
    assert frame_coder(data) == frame_v2.CODER_PLANES and wire_v2.encode_frame_v2(x, cfg, "planes") == data
    want = decode(enc)
    assert torch.equal(decode(from_bytes(data, config=cfg)), want)
    assert torch.equal(wire_v2.decode_frame_v2(data, cfg), want)
    # The same Rice codes as coder 3, so about its size (exceptions and layout aside).
    assert abs(len(data) - len(enc.to_bytes("rice"))) < 0.01 * len(data)


def test_short_and_one_token_frames(cfg):
    small = long_input(7)
    data = encode(small, cfg).to_bytes("planes")
    assert frame_coder(data) == frame_v2.CODER_PLANES
    assert torch.equal(decode(from_bytes(data, config=cfg)), decode(encode(small, cfg)))
    assert torch.equal(wire_v2.decode_frame_v2(data, cfg), decode(encode(small, cfg)))
    one = encode(small[:1], cfg)
    assert one.to_bytes("planes") == one.to_bytes("rans")  # the token form: rANS
    with pytest.raises(ValueError, match="one-token"):
        frame_v2.assemble_frame(cfg, frame_v2.CODER_PLANES, 1, np.zeros(1, dtype=bool), torch.zeros(0).half(),
                                torch.zeros(0, 64).half(), b"")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_path_matches_the_general_path(cfg, planes_isa, dtype):
    x = long_input(300, seed=9).to(dtype)
    data = encode(x, cfg).to_bytes("planes")
    assert wire_v2.encode_frame_v2(x, cfg, "planes") == data
    assert torch.equal(wire_v2.decode_frame_v2(data, cfg), decode(from_bytes(data, config=cfg)))


def test_reference_path_gives_the_same_frames(cfg, monkeypatch):
    x = long_input(40, seed=4)
    enc = encode(x, cfg)
    data = enc.to_bytes("planes")
    monkeypatch.setattr(planes, "has_native", lambda: False)
    assert enc.to_bytes("planes") == data
    assert torch.equal(decode(from_bytes(data, config=cfg)), decode(enc))


def test_fuzz_planes_frames_raise_only_frame_error(cfg, planes_isa):
    x = long_input(seed=2)
    data = encode(x, cfg).to_bytes("planes")
    assert frame_coder(data) == frame_v2.CODER_PLANES
    fuzz_long_frame(data, cfg, lambda b: decode(from_bytes(b, config=cfg)), x.shape)
    fuzz_long_frame(data, cfg, lambda b: wire_v2.decode_frame_v2(b, cfg), x.shape)


def test_forged_planes_header_cannot_force_large_allocations(cfg):
    with pytest.raises(FrameError, match="stream can hold"):
        from_bytes(forged_long_header(frame_v2.CODER_PLANES, cfg), config=cfg)
