"""Codec v2 nibble coder (docs/FORMATS.md §5.6): reference vs C++, frames with either coder, the
fused encode_frame/decode_frame path, fuzzing, the CRC, and the golden vector."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from splitkernels.codec import CodecConfigV2, FrameError, calibrate, decode, encode, from_bytes, nibble, rans
from splitkernels.codec import frame_v2, rice, wire_v2
from splitkernels.codec.frame_v2 import HEAD, _varint
from isa_switch import isa_fixture
from v2_frames import bit_flips, reseal, truncations

_C = nibble._C
HAS_NIB = nibble.has_native()
HAS_FUSED = wire_v2.has_fused()
NEEDS_CPP = pytest.mark.skipif(not HAS_NIB, reason="C++ extension not built (pip install . builds it)")


nib_isa = isa_fixture("nibble", "nib_isa", "the C++ nibble coder")
v2_isa = isa_fixture("v2", "v2_isa", "the fused v2 passes")


def random_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Symbols [T, d] peaked around a random mode with heavy tails, raw flags (raw rows 0), a table."""
    n = int(rng.choice([2, 9, 15, 16, 40, 130, 256]))
    t, d = int(rng.integers(0, 7)), int(rng.choice([1, 2, 7, 63, 64, 65, 129, 200]))
    freqs = rans.build_freqs(rng.dirichlet(np.full(n, 0.5)) * 1000)
    mode = int(np.argmax(freqs))
    spread = float(rng.uniform(0.3, 12.0))
    sym = np.clip(np.round(rng.standard_cauchy((t, d)) * spread + mode), 0, n - 1).astype(np.uint8)
    raw = rng.random(t) < 0.25
    sym[raw] = 0
    return sym, raw, freqs


def cpp_encode(sym: np.ndarray, raw: np.ndarray, freqs: tuple[int, ...]) -> bytes:
    return nibble.encode(sym, raw, freqs)


def decode_or_error(decoder, data: bytes, freqs, raw: np.ndarray, d: int):
    """("ok", symbols) or ("error", None): what a decoder makes of a stream."""
    try:
        return "ok", decoder(data, freqs, raw, d)
    except nibble.NibbleError:
        return "error", None


def ref_decoder(data, freqs, raw, d):
    out = np.zeros((raw.shape[0], d), dtype=np.uint8)
    out[~raw] = nibble.decode_reference(data, freqs, int((~raw).sum()), d)
    return out


def cpp_decoder(data, freqs, raw, d):
    return nibble.decode(data, freqs, raw, d)[0]


# ---------------------------------------------------------------- the coder


def test_window_start_picks_the_heaviest_window():
    assert nibble.window_start((1,) * 10) == 0  # fewer than 15 symbols: the window covers all
    f = [1] * 40
    f[20:35] = [100] * 15
    assert nibble.window_start(tuple(f)) == 20
    assert nibble.window_start((5,) * 30) == 0  # ties: the smallest start
    assert nibble.window_start(tuple([1] * 241 + [50] * 15)) == 241  # the window may end at symbol 255


@pytest.mark.parametrize("seed", range(6))
def test_reference_round_trip_and_layout(seed):
    rng = np.random.default_rng(seed)
    for _ in range(20):
        sym, raw, freqs = random_case(rng)
        data = nibble.encode_reference(sym[~raw], freqs)
        rows, d = int((~raw).sum()), sym.shape[1]
        n_x, n_xx = np.frombuffer(data[:8], dtype="<u4")
        assert len(data) == 8 + nibble.level1_bytes(rows, d) + (n_x + 1) // 2 + n_xx
        a = nibble.window_start(freqs)
        coded = sym[~raw].astype(int)
        assert n_x == int(((coded < a) | (coded >= a + 15)).sum())
        assert np.array_equal(nibble.decode_reference(data, freqs, rows, d), sym[~raw])


@NEEDS_CPP
@pytest.mark.parametrize("seed", range(4))
def test_cpp_matches_reference_on_every_isa(nib_isa, seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(40):
        sym, raw, freqs = random_case(rng)
        data = nibble.encode_reference(sym[~raw], freqs)
        assert cpp_encode(sym, raw, freqs) == data
        out, count = nibble.decode(data, freqs, raw, sym.shape[1], count_of=len(freqs) - 1)
        assert np.array_equal(out, sym)  # raw rows come back 0
        assert count == int((sym[~raw] == len(freqs) - 1).sum())


@NEEDS_CPP
def test_cpp_rejects_exactly_what_the_reference_rejects(nib_isa):
    rng = np.random.default_rng(7)
    for _ in range(60):
        sym, raw, freqs = random_case(rng)
        d = sym.shape[1]
        data = bytearray(nibble.encode_reference(sym[~raw], freqs))
        for _ in range(8):
            bad = bytearray(data)
            kind = int(rng.integers(4))
            if kind == 0 and bad:
                bad[int(rng.integers(len(bad)))] = int(rng.integers(256))
            elif kind == 1 and bad:
                del bad[int(rng.integers(len(bad)))]
            elif kind == 2:
                bad.insert(int(rng.integers(len(bad) + 1)), int(rng.integers(256)))
            elif len(bad) >= 8:  # a head count off by one
                at = 4 * int(rng.integers(2))
                v = int.from_bytes(bad[at : at + 4], "little") + int(rng.choice([-1, 1]))
                bad[at : at + 4] = (v % (1 << 32)).to_bytes(4, "little")
            ref, cpp = decode_or_error(ref_decoder, bytes(bad), freqs, raw, d), decode_or_error(cpp_decoder, bytes(bad), freqs, raw, d)
            assert ref[0] == cpp[0], (ref[0], cpp[0])
            if ref[0] == "ok":
                assert np.array_equal(ref[1], cpp[1])


@pytest.mark.parametrize("decoder", ["reference", "cpp"])
def test_invalid_streams_are_rejected(decoder):
    if decoder == "cpp" and not HAS_NIB:
        pytest.skip("C++ extension not built (pip install . builds it)")
    dec = ref_decoder if decoder == "reference" else cpp_decoder
    freqs = rans.build_freqs(np.exp(-np.abs(np.arange(40) - 20) / 3.0))  # window [13, 28)
    assert nibble.window_start(freqs) == 13
    raw1 = np.zeros(1, dtype=bool)

    def rejects(data: bytes, d: int = 3, raw: np.ndarray = raw1) -> None:
        with pytest.raises(nibble.NibbleError):
            dec(data, freqs, raw, d)

    head = lambda n_x, n_xx: np.array([n_x, n_xx], dtype="<u4").tobytes()  # noqa: E731
    ok = nibble.encode_reference(np.array([[13, 27, 30]], dtype=np.uint8), freqs)  # 30: short exception e = 4
    assert np.array_equal(dec(ok, freqs, raw1, 3), [[13, 27, 30]])
    rejects(ok[:-1])
    rejects(ok + b"\0")
    rejects(b"")
    rejects(head(0, 0) + bytes([0x00, 0x10]))  # row padding nibble (d = 3) set
    rejects(head(1, 0) + bytes([0x00, 0x0F]) + bytes([0x14]))  # level-2 padding nibble set
    rejects(head(1, 1) + bytes([0x00, 0x0F]) + bytes([0x0F]) + bytes([30]))  # long exception at distance 4
    rejects(head(1, 1) + bytes([0x00, 0x0F]) + bytes([0x0F]) + bytes([40]))  # long exception outside the table
    rejects(head(2, 0) + bytes([0x00, 0x0F]) + bytes([0x00]))  # head says 2 exceptions, level 1 holds 1
    rejects(head(0, 0) + bytes([0xF0, 0x00]))  # level 1 holds an exception the head does not count
    rejects(head(0, 0) + bytes(4), d=3, raw=np.zeros(3, dtype=bool))  # too short for 3 rows
    edge = rans.build_freqs(np.exp(-np.abs(np.arange(20) - 2) / 3.0))  # window [0, 15)
    assert nibble.window_start(edge) == 0
    for e in (1, 12):  # distance 1: symbol -1; distance 12: symbol 21 (of 20)
        with pytest.raises(nibble.NibbleError):
            dec(head(1, 0) + bytes([0xF0]) + bytes([e]), edge, raw1, 2)
    assert dec(head(1, 0) + bytes([0xF0]) + bytes([8]), edge, raw1, 2).tolist() == [[0, 19]]  # distance 8
    small = (8000, 8000, 384)  # 3 symbols: window nibbles 3..14 name no symbol
    with pytest.raises(nibble.NibbleError):
        dec(head(0, 0) + bytes([0x05]), small, raw1, 1)


def test_expected_bits_matches_a_large_sample():
    rng = np.random.default_rng(3)
    freqs = rans.build_freqs(np.exp(-np.abs(np.arange(60) - 30) / 4.0))
    p = np.asarray(freqs) / rans.M
    sym = rng.choice(60, size=(400, 500), p=p).astype(np.uint8)
    measured = 8 * (len(nibble.encode_reference(sym, freqs)) - 8) / sym.size
    assert abs(measured - nibble.expected_bits(freqs)) < 0.02


@NEEDS_CPP
def test_crc32_matches_zlib_on_both_paths():
    rng = np.random.default_rng(5)
    for n in [0, 1, 15, 16, 63, 64, 65, 127, 128, 129, 255, 256, 257, 320, 511, 1000, 4095, 4096, 65537]:
        data = rng.integers(0, 256, n, dtype=np.uint8)
        crc = int(rng.integers(0, 1 << 32))
        for table_only in (False, True):
            assert _C.crc32(data.ctypes.data, n, crc, table_only) == zlib.crc32(data.tobytes(), crc)
    parts = [bytes(rng.integers(0, 256, n, dtype=np.uint8)) for n in (10, 5000, 3, 70000)]
    assert frame_v2.crc32(parts) == zlib.crc32(b"".join(parts))


# ---------------------------------------------------------------- frames


def activations(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 2.0, d)
    x[:, 1] *= 12.0
    x[0] *= 300.0
    return x


@pytest.fixture(scope="module")
def cfg() -> CodecConfigV2:
    return calibrate(activations(800, 64, seed=1), bits=4.0)


def frame_coder(data: bytes) -> int:
    return data[5] >> 4


def test_coder_rule_and_explicit_coders(cfg):
    small = activations(5, 64, seed=2).half()
    assert frame_coder(encode(small, cfg).to_bytes("auto")) == frame_v2.CODER_RANS  # one-token-sized frames: rANS
    t = frame_v2.FAST_MIN_SYMBOLS // 64
    long = activations(t, 64, seed=3).half()
    want = frame_v2.choose_coder(t, 64, cfg)
    # This table suits the Rice coder, which "auto" takes where it runs vectorised.
    assert want == (frame_v2.CODER_RICE if rice.vectorised() else frame_v2.CODER_RANS_WIDE)
    assert frame_coder(encode(long, cfg).to_bytes("auto")) == want
    assert frame_coder(wire_v2.encode_frame_v2(long, cfg, "auto")) == want
    # Without a coder, frames take rANS (the fewest bytes), long ones in the 32-lane layout.
    wide = frame_v2.CODER_RANS_WIDE
    assert frame_coder(encode(long, cfg).to_bytes()) == frame_coder(wire_v2.encode_frame_v2(long, cfg)) == wide
    assert frame_coder(encode(long, cfg).to_bytes("rans")) == wide
    assert frame_coder(encode(long[:-1], cfg).to_bytes("rans")) == frame_v2.CODER_RANS_FOUR  # one token short of 2^16 values
    for name, code in frame_v2.CODERS.items():
        data = encode(small, cfg).to_bytes(name)
        assert frame_coder(data) == code
        assert torch.equal(decode(from_bytes(data, config=cfg)), decode(encode(small, cfg)))
    with pytest.raises(ValueError, match="coder must be one of"):
        encode(small, cfg).to_bytes("huffman")
    # A table far from the Rice coder's sweet spot (a near-uniform alphabet of 256) stays on rANS.
    flat = CodecConfigV2(center=(0.0,) * 64, step=(1.0,) * 64, kmax=127, freqs=rans.build_freqs(np.ones(256)), raw_limit=32)
    assert frame_v2.choose_coder(1 << 14, 64, flat) == frame_v2.CODER_RANS_WIDE


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("coder", ["nibble", "rans"])
def test_encode_frame_and_decode_frame_match_the_general_path(cfg, v2_isa, nib_isa, dtype, coder):
    x = activations(9, 64, seed=4)
    x[4] = x[4] * 40.0 + 3000.0  # a sink in the middle: travels raw
    x[6, 5] = 1e4  # an escape in a coded row
    x = x.to(dtype)
    enc = encode(x, cfg)
    data = enc.to_bytes(coder)
    assert wire_v2.encode_frame_v2(x, cfg, coder) == data
    assert frame_coder(data) == frame_v2.CODERS[coder]
    want = decode(enc)
    assert torch.equal(decode(from_bytes(data, config=cfg)), want)
    assert torch.equal(wire_v2.decode_frame_v2(data, cfg), want)
    assert enc.raw.tolist()[4] and enc.escapes.numel() >= 1 + int(enc.raw[0] == 0)


def test_reference_nibble_path_gives_the_same_frames(cfg, monkeypatch):
    x = activations(7, 64, seed=5).half()
    x[2] *= 50.0
    enc = encode(x, cfg)
    data = enc.to_bytes("nibble")
    monkeypatch.setattr(nibble, "has_native", lambda: False)
    monkeypatch.setattr(wire_v2, "has_fused", lambda: False)
    assert enc.to_bytes("nibble") == data
    assert wire_v2.encode_frame_v2(x, cfg, "nibble") == data
    assert torch.equal(decode(from_bytes(data, config=cfg)), decode(enc))
    assert torch.equal(wire_v2.decode_frame_v2(data, cfg), decode(enc))


def test_long_frames_round_trip_through_the_public_api(cfg):
    from splitkernels.codec import decode_frame, encode_frame

    x = activations(frame_v2.FAST_MIN_SYMBOLS // 64 + 3, 64, seed=6).half()
    for coder, code in (("nibble", frame_v2.CODER_NIBBLE), ("auto", frame_v2.choose_coder(x.shape[0], 64, cfg))):
        data = encode_frame(x, cfg, coder)
        assert data == encode(x, cfg).to_bytes(coder) and frame_coder(data) == code
        assert torch.equal(decode_frame(data, config=cfg), decode(encode(x, cfg)))


# ---------------------------------------------------------------- fuzzing nibble frames


def _decode_both_or_frame_error(data: bytes, cfg: CodecConfigV2) -> None:
    """Both decoders raise FrameError (and nothing else), or both decode to the same bounded tensor."""
    results = []
    for fn in (lambda: decode(from_bytes(data, config=cfg)), lambda: wire_v2.decode_frame_v2(data, cfg)):
        try:
            results.append(fn())
        except FrameError:
            results.append(None)
    assert (results[0] is None) == (results[1] is None)
    if results[0] is not None:
        assert torch.equal(results[0], results[1])
        assert results[0].numel() * results[0].element_size() <= 64 * len(data) + 1024


def _nibble_frame(cfg: CodecConfigV2, seed: int) -> bytes:
    x = activations(7, 64, seed=seed).half()
    x[3] *= 60.0  # raw
    x[5, 7] = 5e3  # escape
    return encode(x, cfg).to_bytes("nibble")


def test_fuzz_nibble_frames_truncations_and_bit_flips(cfg):
    data = _nibble_frame(cfg, 11)
    for bad in (*truncations(data), *bit_flips(data, 200, seed=0)):
        with pytest.raises(FrameError):
            from_bytes(bad, config=cfg)
        with pytest.raises(FrameError):
            wire_v2.decode_frame_v2(bad, cfg)


def test_fuzz_resealed_nibble_frames_raise_only_frame_error(cfg):
    body = _nibble_frame(cfg, 12)[:-4]
    rng = np.random.default_rng(1)
    for _ in range(400):
        bad = bytearray(body)
        kind = int(rng.integers(4))
        if kind == 0:
            bad[int(rng.integers(len(bad)))] = int(rng.integers(256))
        elif kind == 1:
            del bad[int(rng.integers(len(bad)))]
        elif kind == 2:
            bad.insert(int(rng.integers(len(bad) + 1)), int(rng.integers(256)))
        else:  # flip a nibble of the stream only
            at = int(rng.integers(len(bad) - 200, len(bad)))
            bad[at] ^= 0x0F << (4 * int(rng.integers(2)))
        _decode_both_or_frame_error(reseal(bytes(bad), cfg), cfg)


def test_fuzz_forged_nibble_headers_cannot_force_large_allocations(cfg):
    x = activations(3, 64, seed=13)[1:].half()
    data = encode(x, cfg).to_bytes("nibble")
    head = data[: HEAD.size]
    rest = data[HEAD.size + 2 : -4]  # after the T and escape varints (one byte each here)
    for t in (3, 255, 1 << 20, (1 << 24) + 1, (1 << 35) - 1):
        for n_esc in (0, 1, 1 << 30):
            _decode_both_or_frame_error(reseal(head + _varint(t) + _varint(n_esc) + rest, cfg), cfg)
    # A huge T with a tiny stream is refused before anything T-sized is allocated.
    forged = reseal(head + _varint(1 << 24) + _varint(0) + bytes((1 << 24) // 8) + b"\1" * 40, cfg)
    for fn in (lambda: from_bytes(forged, config=cfg), lambda: wire_v2.decode_frame_v2(forged, cfg)):
        with pytest.raises(FrameError, match="stream can hold"):
            fn()
    for coder in (7,):  # an unknown coder
        forged = reseal(HEAD.pack(b"SKTQ", 2, 1 | coder << 4) + data[HEAD.size : -4], cfg)
        with pytest.raises(FrameError, match="unknown symbol coder"):
            from_bytes(forged, config=cfg)


# ---------------------------------------------------------------- golden vector

# kmax 18 (38 symbols), a table of about exp(-|q| / 3): window [11, 26) = codes -7..7. d = 5 (a padding nibble
# per row), raw_limit 1. Row 0: codes 0, 3, -7, 8 (8.5 rounds to even), 16 -> symbol 26 is a short
# exception (distance 0), 34 a long one (distance 16). Row 1: -8 (short, distance 1), -15 (long,
# distance 15), 100 escapes (symbol 37, long), 2.5 -> 2, 0.5 -> 0. Row 2: two escapes -> raw.
GOLDEN_FREQS = (7, 10, 14, 19, 26, 36, 50, 70, 97, 135, 189, 263, 367, 512, 714, 997, 1391, 1940, 2708, 1940, 1391,
                996, 714, 512, 367, 263, 189, 135, 97, 70, 50, 36, 26, 19, 14, 10, 7, 3)
GOLDEN = CodecConfigV2(center=(0.0,) * 5, step=(1.0,) * 5, kmax=18, freqs=GOLDEN_FREQS, raw_limit=1)
GOLDEN_X = torch.tensor([[0.0, 3.0, -7.0, 8.5, 16.0], [-8.0, -15.0, 100.0, 2.5, 0.5], [50.0, -60.0, 1.0, 2.0, 3.0]],
                        dtype=torch.float16)
GOLDEN_FRAME = bytes.fromhex(
    "534b5451" "02" "11"  # magic, version 2, fp16 + coder 1 (nibble)
    "03" "01" "04"  # T = 3, 1 escape, raw bitmap: token 2
    "4056"  # escape value 100 (fp16)
    "4052" "80d3" "003c" "0040" "0042"  # raw token 2 (fp16)
    "0500000003000000a7f00fff9f07f0f10f220325"  # nibble stream
    "064768a0"  # crc32, continued from the config's crc_seed 0x5bdfe08a
)


def test_golden_nibble_frame():
    assert nibble.window_start(GOLDEN.freqs) == 11
    enc = encode(GOLDEN_X, GOLDEN)
    assert enc.symbols[:2].tolist() == [[18, 21, 11, 26, 34], [10, 3, 37, 20, 18]]
    assert enc.raw.tolist() == [False, False, True]
    stream = bytes.fromhex(
        "05000000" "03000000"  # 5 exceptions, 3 long
        "a7f00f" "ff9f07"  # level 1: rows (7, 10, 0, 15, 15 | 15, 15, 15, 9, 7), padding nibbles 0
        "f0f1" "0f"  # level 2: 0, 15, 1, 15, 15 (+ padding 0)
        "220325"  # level 3: 34, 3, 37
    )
    assert GOLDEN.crc_seed == 0x5BDFE08A
    assert nibble.encode_reference(enc.symbols[:2].numpy(), GOLDEN.freqs) == stream
    assert GOLDEN_FRAME[-4 - len(stream) : -4] == stream
    assert enc.to_bytes("nibble") == GOLDEN_FRAME
    assert wire_v2.encode_frame_v2(GOLDEN_X, GOLDEN, "nibble") == GOLDEN_FRAME
    data = GOLDEN_FRAME
    want = [[0.0, 3.0, -7.0, 8.0, 16.0], [-8.0, -15.0, 100.0, 2.0, 0.0], [50.0, -60.0, 1.0, 2.0, 3.0]]
    assert decode(from_bytes(data, config=GOLDEN)).tolist() == want
    assert wire_v2.decode_frame_v2(data, GOLDEN).tolist() == want
