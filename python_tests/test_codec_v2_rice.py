"""The Rice coder of long codec v2 frames (coder 3, docs/FORMATS.md §5.7): its parameters, the
reference against the C++ coder on each of its instruction sets, hand-computed states, golden
bytes, corruption, and frames that carry it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from splitkernels.codec import CodecConfigV2, FrameError, decode, encode, frame_v2, from_bytes, rans, rice
from splitkernels.codec import wire_v2

from isa_switch import check_unknown_isa_refused, isa_fixture
from v2_frames import bit_flips, forged_long_header, frame_coder, fuzz_long_frame, long_frame_config, long_input

rice_isa = isa_fixture("rice", "rice_isa", "the C++ Rice coder")


def laplace_symbols(rng, n: int, centres: np.ndarray, nsym: int, scale: float = 3.0) -> np.ndarray:
    """Two-sided geometric symbols around each channel's centre (channel ``i % len(centres)``),
    clipped to the alphabet, with the top symbol (an escape) sprinkled in."""
    v = np.round(rng.laplace(0.0, scale, n)).astype(np.int64)
    sym = np.clip(centres[np.arange(n) % len(centres)].astype(np.int64) + v, 0, nsym - 1)
    sym[rng.random(n) < 0.01] = nsym - 1
    return sym.astype(np.uint8)


# ---------------------------------------------------------------- parameters


def test_table_params_pick_the_mode_and_the_cheapest_k():
    freqs = (1024, 3072, 8192, 3072, 1023, 1)
    # k = 0 costs 4, 2, 1, 3, 5, 7 bits (sum 32770 over 2^14); k = 1 costs 3, 2, 2, 3, 4, 5 (38913).
    assert rice.table_params(freqs) == (2, 0)
    assert rice.code_bits(freqs, 2, 0).tolist() == [4, 2, 1, 3, 5, 7]
    assert rice.code_bits(freqs, 2, 1).tolist() == [3, 2, 2, 3, 4, 5]
    # Ties: the smallest mode.
    assert rice.table_params((4096, 4096, 4096, 4096))[0] == 0
    rng = np.random.default_rng(0)
    for _ in range(20):
        f = rans.build_freqs(rng.random(int(rng.integers(2, 257))) ** 4)
        centre, k = rice.table_params(tuple(f))
        assert f[centre] == max(f) and list(f).index(max(f)) == centre
        costs = [int((np.asarray(f) * rice.code_bits(f, centre, kk)).sum()) for kk in range(rice.MAX_K + 1)]
        assert costs[k] == min(costs) and costs.index(min(costs)) == k
    # An exception costs its 16 - k one bits and its byte.
    assert rice.code_bits((1,) * 40, 0, 2)[39] == 16 - 2 + 8


def test_a_wider_table_takes_a_larger_k():
    tables = [tuple(rans.build_freqs(np.exp(-np.abs(np.arange(101) - 50) / w))) for w in (0.5, 2.0, 8.0, 32.0)]
    ks = [rice.table_params(t)[1] for t in tables]
    assert ks == sorted(ks) and ks[0] == 0 and ks[-1] >= 4
    # Two-sided geometric tables are what Rice codes fit; a flat alphabet is not (the coder rule's guard).
    # (Rice codes have power-of-two buckets, so such tables cost 0.1-0.22 bit over their entropy.)
    assert all(0.0 < rice.extra_bits([t]) < frame_v2.RICE_MAX_EXTRA_BITS for t in tables)
    assert rice.extra_bits([tuple(rans.build_freqs(np.ones(256)))]) > frame_v2.RICE_MAX_EXTRA_BITS


def test_expected_bits_match_the_stream_and_classes_map_to_channels():
    rng = np.random.default_rng(3)
    tables = [tuple(rans.build_freqs(np.exp(-np.abs(np.arange(60) - 30) / w))) for w in (1.0, 4.0)]
    table_of = [0, 1, 1, 0, 1]
    centres, ks = rice.channel_params(tables, table_of)
    assert [(int(c), int(k)) for c, k in zip(centres, ks)] == [rice.table_params(tables[i]) for i in table_of]
    n = 200_000  # symbols drawn from each channel's table
    p = [np.asarray(t, dtype=np.float64) / rans.M for t in tables]
    sym = np.stack([rng.choice(60, size=n // 5, p=p[i]) for i in table_of], axis=1).astype(np.uint8).reshape(-1)
    measured = 8 * len(rice.encode(sym, centres, ks, 60)) / sym.size
    want = sum(rice.expected_bits([tables[i]]) for i in table_of) / len(table_of)
    assert abs(measured - want) < 0.02


# ---------------------------------------------------------------- the coder


@pytest.mark.parametrize("n,period,nsym", [(1, 1, 2), (5, 3, 40), (31, 7, 20), (32, 32, 256), (33, 5, 9),
                                           (1000, 37, 170), (4133, 640, 142), (70_001, 576, 178), (70_000, 1, 6)])
def test_reference_round_trip_and_native_bytes(rice_isa, n, period, nsym):
    rng = np.random.default_rng(n + period + nsym)
    centres = rng.integers(0, nsym, period).astype(np.uint8)
    ks = rng.integers(0, rice.MAX_K + 1, period).astype(np.uint8)
    sym = laplace_symbols(rng, n, centres, nsym)
    data = rice.encode_reference(sym, centres, ks, nsym)
    assert len(data) >= rice.HEAD_BYTES and n <= rice.max_symbols(len(data))
    assert np.array_equal(rice.decode_reference(data, n, centres, ks, nsym), sym)
    assert rice.encode(sym, centres, ks, nsym) == data
    out, count = rice.decode(data, n, centres, ks, nsym, count_of=nsym - 1)
    assert np.array_equal(out, sym) and count == int((sym == nsym - 1).sum())


@pytest.mark.parametrize("k", [0, 3, 5])
def test_every_symbol_an_exception_and_every_symbol_the_centre(rice_isa, k):
    n, nsym = 3001, 256
    centres, ks = np.zeros(1, dtype=np.uint8), np.full(1, k, dtype=np.uint8)
    far = np.full(n, 255, dtype=np.uint8)  # u = 510: quotient 510 >> k >= 16 - k for k <= 5
    data = rice.encode(far, centres, ks, nsym)
    assert data == rice.encode_reference(far, centres, ks, nsym)
    assert int.from_bytes(data[:4], "little") == n and data.endswith(bytes(far))
    assert np.array_equal(rice.decode(data, n, centres, ks, nsym)[0], far)
    same = np.zeros(n, dtype=np.uint8)  # k + 1 bits each
    data = rice.encode(same, centres, ks, nsym)
    assert data == rice.encode_reference(same, centres, ks, nsym)
    assert np.array_equal(rice.decode(data, n, centres, ks, nsym)[0], same)


def test_one_symbol_per_lane_gives_hand_computed_states():
    # Centre 2, k = 0 (the golden table): symbol 3 is u = 2, the code 0b011 of 3 bits (two ones, a
    # zero); symbol 0 is u = 3, 0b0111 of 4 bits; the centre is one zero bit. A state starts at
    # 2^16 and takes (x << len) | code; 32 symbols fill each lane once and emit no word.
    freqs = (1024, 3072, 8192, 3072, 1023, 1)
    centres, ks = rice.channel_params([freqs], [0])
    sym = np.array([3, 0, 2] + [2] * 29, dtype=np.uint8)
    data = rice.encode_reference(sym, centres, ks, 6)
    states = np.frombuffer(data[4:], dtype="<u4")
    assert len(data) == rice.HEAD_BYTES and data[:4] == bytes(4)
    assert states[0] == (1 << 19) | 0b011 and states[1] == (1 << 20) | 0b0111 and states[2] == 1 << 17


# Golden stream (docs/FORMATS.md §5.7): 160 symbols of a 20-symbol table, one table, with words
# and exceptions (symbol 19 is 17 above the centre: u = 34 >= 16).
GOLDEN_FREQS = (1024, 3072, 8192, 3072, 1009) + (1,) * 15
GOLDEN_SYMBOLS = np.array([3, 3, 19, 2, 0, 5, 5, 0] * 20, dtype=np.uint8)
GOLDEN_STREAM = bytes.fromhex(
    "14000000db360080db360080ffff010000002000770010003f0008003f00080077001000db360080db360080ffff0100"
    "00002000770010003f0008003f00080077001000db360080db360080ffff010000002000770010003f0008003f000800"
    "77001000db360080db360080ffff010000002000770010003f0008003f00080077001000ffffbf1fbf1fffffbf1fbf1f"
    "ffffbf1fbf1fffffbf1fbf1fffff77077707ffff77077707ffff77077707ffff77077707ffffbf1fbf1fffffbf1fbf1f"
    "ffffbf1fbf1fffffbf1fbf1fffffffffffffffff00000000000000001313131313131313131313131313131313131313")


def test_golden_stream(rice_isa):
    centres, ks = rice.channel_params([GOLDEN_FREQS], [0])
    assert (int(centres[0]), int(ks[0])) == (2, 0)
    assert rice.encode_reference(GOLDEN_SYMBOLS, centres, ks, 20) == GOLDEN_STREAM
    assert rice.encode(GOLDEN_SYMBOLS, centres, ks, 20) == GOLDEN_STREAM
    assert rice.decode(GOLDEN_STREAM, 160, centres, ks, 20)[0].tolist() == GOLDEN_SYMBOLS.tolist()


def random_stream(seed: int, nsym: int, period: int, n: int, lo: int):
    """``(symbols, centres, ks)``: centres in ``[lo, lo + 20)``, ``k`` in 0..3, two-sided geometric symbols."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(lo, lo + 20, period).astype(np.uint8)
    ks = rng.integers(0, 4, period).astype(np.uint8)
    return laplace_symbols(rng, n, centres, nsym), centres, ks


def _rejects_corruption(dec) -> None:
    nsym, n = 40, 3000
    sym, centres, ks = random_stream(7, nsym, 64, n, 10)
    data = rice.encode_reference(sym, centres, ks, nsym)
    for bad in (data[:-2], data[: len(data) // 2], data[: rice.HEAD_BYTES], data[:3], data + b"\0\0", data[:-1]):
        with pytest.raises(rice.RiceError):
            dec(bad, n, centres, ks, nsym)
    for wrong_n in (n - 1, n + 1):
        with pytest.raises(rice.RiceError):
            dec(data, wrong_n, centres, ks, nsym)
    with pytest.raises(rice.RiceError):
        dec(data, n, centres, (ks + 1).astype(np.uint8), nsym)
    caught = 0
    for bad in bit_flips(data, 200, seed=3):
        try:
            out = dec(bad, n, centres, ks, nsym)
        except rice.RiceError:
            caught += 1
            continue
        assert out.shape == (n,) and int(out.max()) < nsym
    assert caught > 100  # the end-state check catches most corruptions by itself


def test_reference_rejects_corruption():
    _rejects_corruption(rice.decode_reference)


def test_native_rejects_corruption(rice_isa):
    _rejects_corruption(lambda *a: rice.decode(*a)[0])


def test_native_decoder_never_reads_past_a_truncated_stream(rice_isa):
    nsym, n = 60, 20_000
    sym, centres, ks = random_stream(8, nsym, 96, n, 20)
    data = rice.encode(sym, centres, ks, nsym)
    for cut in range(1, 200, 3):
        with pytest.raises(rice.RiceError):
            rice.decode(data[:-cut], n, centres, ks, nsym)


def test_non_canonical_exceptions_are_refused(rice_isa):
    # An exception byte naming a symbol a plain code reaches (or one outside the table) is invalid.
    centres, ks = np.array([2], dtype=np.uint8), np.array([0], dtype=np.uint8)
    sym = np.array([19] * 40, dtype=np.uint8)
    data = bytearray(rice.encode_reference(sym, centres, ks, 20))
    for byte in (3, 20):
        bad = bytes(data[:-1]) + bytes([byte])
        for dec in (rice.decode_reference, lambda *a: rice.decode(*a)[0]):
            with pytest.raises(rice.RiceError):
                dec(bad, 40, centres, ks, 20)


def test_bad_symbols_and_parameters_are_refused():
    centres, ks = np.array([2], dtype=np.uint8), np.array([0], dtype=np.uint8)
    sym = np.zeros(70_000, dtype=np.uint8)
    sym[-3] = 6  # one past the alphabet
    with pytest.raises(ValueError, match="outside the table of 6 symbols"):
        rice.encode_reference(sym, centres, ks, 6)
    with pytest.raises(ValueError, match="outside the table of 6 symbols"):
        rice.encode(sym, centres, ks, 6)
    with pytest.raises(ValueError, match="parameter is out of range"):
        rice.encode(sym[:10], centres, np.array([8], dtype=np.uint8), 6)
    with pytest.raises(rice.RiceError, match="cannot fit"):
        rice.decode(b"\0" * 200, 10**7, centres, ks, 6)


@pytest.mark.skipif(not rice.has_native(), reason="C++ extension not built (pip install . builds it)")
def test_unknown_instruction_set_is_refused_and_changes_nothing():
    check_unknown_isa_refused("rice")


# ---------------------------------------------------------------- frames


@pytest.fixture(scope="module")
def cfg() -> CodecConfigV2:
    return long_frame_config()


def test_auto_takes_rice_for_long_frames_where_it_runs_vectorised(cfg, rice_isa):
    x = long_input()
    enc = encode(x, cfg)
    want = frame_v2.CODER_RANS_WIDE if rice_isa == "scalar" else frame_v2.CODER_RICE
    assert frame_v2.choose_coder(x.shape[0], 64, cfg) == want and rice.vectorised() == (rice_isa != "scalar")
    assert frame_coder(enc.to_bytes("auto")) == frame_coder(wire_v2.encode_frame_v2(x, cfg, "auto")) == want
    data = enc.to_bytes("rice")
    assert frame_coder(data) == frame_v2.CODER_RICE and wire_v2.encode_frame_v2(x, cfg, "rice") == data
    want = decode(enc)
    assert torch.equal(decode(from_bytes(data, config=cfg)), want)
    assert torch.equal(wire_v2.decode_frame_v2(data, cfg), want)
    sym = enc.symbols.numpy()[~enc.raw.numpy()]
    stream = rice.encode(sym, *cfg.rice_params, len(cfg.freqs))
    assert stream in data
    # Within a quarter bit per symbol of rANS on calibrated tables (the rule's guard).
    wide = rans.encode(sym, cfg.rans_tables, n_lanes=rans.WIDE_LANES)
    assert len(stream) * 8 / sym.size < len(wide) * 8 / sym.size + frame_v2.RICE_MAX_EXTRA_BITS


def test_short_and_one_token_frames(cfg):
    small = long_input(7)
    data = encode(small, cfg).to_bytes("rice")
    assert frame_coder(data) == frame_v2.CODER_RICE
    assert torch.equal(decode(from_bytes(data, config=cfg)), decode(encode(small, cfg)))
    assert frame_v2.choose_coder(7, 64, cfg) == frame_v2.CODER_RANS  # short: rANS under "auto"
    one = encode(small[:1], cfg)
    assert one.to_bytes("rice") == one.to_bytes("rans")  # the token form: rANS
    with pytest.raises(ValueError, match="one-token"):
        frame_v2.assemble_frame(cfg, frame_v2.CODER_RICE, 1, np.zeros(1, dtype=bool), torch.zeros(0).half(),
                                torch.zeros(0, 64).half(), b"")


def test_reference_path_gives_the_same_frames(cfg, monkeypatch):
    x = long_input(40, seed=4)
    enc = encode(x, cfg)
    data = enc.to_bytes("rice")
    monkeypatch.setattr(rice, "has_native", lambda: False)
    assert enc.to_bytes("rice") == data
    assert torch.equal(decode(from_bytes(data, config=cfg)), decode(enc))


def test_fuzz_rice_frames_raise_only_frame_error(cfg, rice_isa):
    x = long_input(seed=2)
    data = encode(x, cfg).to_bytes("rice")
    assert frame_coder(data) == frame_v2.CODER_RICE
    fuzz_long_frame(data, cfg, lambda b: decode(from_bytes(b, config=cfg)), x.shape)


def test_forged_rice_header_cannot_force_large_allocations(cfg):
    with pytest.raises(FrameError, match="stream can hold"):
        from_bytes(forged_long_header(frame_v2.CODER_RICE, cfg), config=cfg)
