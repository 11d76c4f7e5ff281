"""Codec v2: rANS coder (reference vs C++), calibration, encode/decode, v2 frames, dispatch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from splitkernels.codec import (
    CodecConfig, CodecConfigV2, EncodedV2, FrameError, FrameLimits, calibrate, decode, decode_frame, encode,
    encode_frame, from_bytes, rans, wire_v2,
)
from splitkernels.codec.frame_v2 import HEAD
from splitkernels.codec import v2 as v2mod
from splitkernels.codec.v2 import decode_v2, encode_v2
from isa_switch import isa_fixture
from v2_frames import bit_flips, byte_mutations, reseal, truncations

HAS_CPP = rans._C is not None and hasattr(rans._C, "rans_encode")


def random_table(rng: np.random.Generator, n: int) -> tuple[int, ...]:
    return rans.build_freqs(rng.dirichlet(np.full(n, 0.3)) * 1000)


# ---------------------------------------------------------------- rANS


@pytest.mark.parametrize("n", [0, 1, 2, 7, 577, rans.LANES_MIN_SYMBOLS - 1, rans.LANES_MIN_SYMBOLS,
                               rans.LANES_MIN_SYMBOLS + 3])
def test_rans_reference_round_trip(n):
    rng = np.random.default_rng(n)
    nsym = int(rng.integers(2, 257))
    freqs = random_table(rng, nsym)
    sym = rng.choice(nsym, size=n, p=np.asarray(freqs) / rans.M).astype(np.uint8)
    data = rans.encode_reference(sym, freqs)
    assert np.array_equal(rans.decode_reference(data, freqs, n), sym)
    if n:
        # Within a few bytes of the ideal code length of the table.
        ideal = -np.log2(np.asarray(freqs, dtype=np.float64)[sym] / rans.M).sum() / 8
        assert ideal - 1 <= len(data) <= ideal + 4 * rans.lanes(n) + 2


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built (pip install . builds splitkernels._C)")
@pytest.mark.parametrize("seed", range(6))
def test_rans_cpp_matches_reference(seed):
    rng = np.random.default_rng(100 + seed)
    nsym = int(rng.integers(2, 257))
    freqs = random_table(rng, nsym)
    n = int(rng.choice([1, 3, 576, rans.LANES_MIN_SYMBOLS + int(rng.integers(0, 9))]))
    sym = rng.integers(0, nsym, size=n).astype(np.uint8)  # any symbol, however unlikely
    ref = rans.encode_reference(sym, freqs)
    assert rans.encode(sym, freqs) == ref
    assert np.array_equal(rans.decode(ref, freqs, n), sym)


@pytest.mark.parametrize("decoder", ["reference", "default"])
def test_rans_rejects_corruption(decoder):
    rng = np.random.default_rng(7)
    freqs = random_table(rng, 20)
    sym = rng.integers(0, 20, size=300).astype(np.uint8)
    data = bytearray(rans.encode_reference(sym, freqs))
    dec = rans.decode_reference if decoder == "reference" else rans.decode
    with pytest.raises(rans.RansError):
        dec(bytes(data[:-2]), freqs, 300)
    with pytest.raises(rans.RansError):
        dec(bytes(data) + b"\0\0", freqs, 300)
    with pytest.raises(rans.RansError):
        dec(bytes(data), freqs, 299)
    flipped = 0
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x10
        try:
            out = dec(bytes(bad), freqs, 300)
        except rans.RansError:
            flipped += 1
            continue
        assert out.shape == (300,)
    assert flipped > len(data) // 2  # the end-state check catches most corruptions by itself


def test_rans_symbol_bound_holds_for_the_most_skewed_table():
    freqs = rans.build_freqs([1e9] + [0] * 255)
    assert max(freqs) == rans.MAX_FREQ
    for n in (100, 5000, 40000):
        data = rans.encode(np.zeros(n, dtype=np.uint8), freqs)
        assert n <= rans.max_symbols(len(data))


def _freqs_one_unit_at_a_time(counts) -> tuple[int, ...]:
    """build_freqs' rule in its plain form: every rounding unit handed out (or taken back) alone."""
    c = np.asarray(counts, dtype=np.float64)
    n, total = c.shape[0], c.sum()
    p = c / total if total > 0 else np.full(n, 1.0 / n)
    f = np.minimum(np.maximum(1, np.floor(p * (rans.M - n)).astype(np.int64) + 1), rans.MAX_FREQ)
    while f.sum() != rans.M:
        if f.sum() < rans.M:
            f[int(np.argmax(np.where(f < rans.MAX_FREQ, p / f, -1.0)))] += 1
        else:
            f[int(np.argmin(np.where(f > 1, p / (f - 1), np.inf)))] -= 1
    return tuple(int(v) for v in f)


def test_build_freqs_equals_one_unit_at_a_time():
    rng = np.random.default_rng(11)
    cases = [[1e9] + [0] * 255, [0, 0, 0], [5, 5], [1, 0, 0, 1], [3.0] * 256, [1e9, 1e9, 1, 0, 0]]
    for n in (2, 3, 6, 17, 64, 200, 256):
        cases += [rng.random(n) ** 4 * 1e6, rng.dirichlet(np.full(n, 0.05)) * 1e5, np.bincount(
            rng.integers(0, n, 7), minlength=n), np.where(rng.random(n) < 0.9, 0, rng.random(n))]
        peaked = np.zeros(n)
        peaked[n // 2] = 1e6
        peaked[rng.integers(0, n, 3)] += rng.random(3) * 100  # one symbol capped, a few units elsewhere
        cases.append(peaked)
    for counts in cases:
        assert rans.build_freqs(counts) == _freqs_one_unit_at_a_time(counts), counts


def test_build_freqs_properties():
    rng = np.random.default_rng(3)
    for n in (2, 3, 17, 256):
        f = rans.build_freqs(rng.random(n) ** 4 * 1e6)
        rans.check_freqs(f)
    assert rans.build_freqs([0, 0, 0]) == rans.build_freqs([1, 1, 1])
    with pytest.raises(ValueError, match="entries"):
        rans.build_freqs([1.0])
    with pytest.raises(ValueError, match="sum"):
        rans.check_freqs([1, 2])


# ---------------------------------------------------------------- calibration


def activations(n: int, d: int, seed: int = 0, massive: float | None = None) -> torch.Tensor:
    """Gaussian tokens with a few heavy channels, a sink at row 0, optionally a massive channel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, 1] *= 12.0
    x[:, d // 2] += 4.0
    if massive is not None:
        x[:, 2] = massive * (1 + 0.05 * torch.randn(n, generator=g))
    x[0] *= 300.0
    return x


def test_calibrate_config_is_frozen_serialisable_and_deterministic():
    h = activations(800, 96)
    a, b = calibrate(h, bits=4.0), calibrate(h, bits=4.0)
    assert a == b and a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    back = CodecConfigV2.from_json(a.to_json())
    assert back == a and back.fingerprint == a.fingerprint
    assert calibrate(h, bits=3.0).fingerprint != a.fingerprint
    with pytest.raises(Exception):
        a.kmax = 3
    d = a.to_dict()
    d["step"] = d["step"][:-1] + [d["step"][-1] * 2]
    with pytest.raises(ValueError, match="fingerprint"):
        CodecConfigV2.from_dict(d)


@pytest.mark.parametrize("target", [3.0, 4.0, 5.0])
def test_calibrate_meets_bit_target_on_fresh_data(target):
    cfg = calibrate(activations(2048, 128, seed=1), bits=target)
    fresh = activations(512, 128, seed=2)
    bits = 8 * len(encode(fresh.half(), cfg).to_bytes("rans")) / fresh.numel()  # calibrate aims at the rANS rate
    assert abs(bits - target) < 0.25, bits


def test_calibrate_is_robust_to_sinks_and_massive_channels():
    plain = calibrate(activations(1000, 64, seed=3), bits=4.0)
    heavy = calibrate(activations(1000, 64, seed=3, massive=3000.0), bits=4.0)
    assert heavy.info["sink_tokens"] >= 1
    # The massive channel's constant part goes into its center, and the other channels keep their step.
    assert abs(heavy.center[2] - 3000.0) < 50
    ratio = heavy.step_array()[3:] / plain.step_array()[3:]
    assert np.all((ratio > 0.8) & (ratio < 1.25)), ratio
    x = activations(64, 64, seed=4, massive=3000.0)
    enc = encode(x, heavy)
    y = decode(enc)
    ok = ~(enc.symbols == heavy.escape_symbol) & ~enc.raw[:, None]
    err = (y - x).abs()
    assert (err <= torch.tensor(heavy.step_array()) * 0.5 * (1 + 1e-5) + 1e-3)[ok].all()
    assert torch.equal(y[~ok], x[~ok])


def test_calibrate_with_sensitivity_and_kl_proxy():
    h = activations(1000, 64, seed=5)
    f = torch.ones(64)
    f[7] = 100.0  # channel 7 matters 100x more: a 10x finer step there
    cfg = calibrate(h, bits=4.0, sensitivity=f)
    s = cfg.step_array()
    assert s[7] == pytest.approx(s[8] / 10, rel=1e-3)
    tight = calibrate(h, max_kl_proxy=1e-4, sensitivity=f)
    loose = calibrate(h, max_kl_proxy=1e-2, sensitivity=f)
    assert tight.info["kl_proxy"] <= 1e-4 and loose.info["kl_proxy"] <= 1e-2
    assert tight.step_array()[0] < loose.step_array()[0]
    capped = calibrate(h, bits=3.0, max_kl_proxy=1e-6, sensitivity=f)  # budget wins
    assert capped.info["estimated_bits"] <= 3.0
    refit = calibrate(h, bits=3.0, base=cfg)
    assert np.allclose(refit.step_array() / refit.step_array()[0], s / s[0], rtol=1e-5)


def test_calibrate_default_rule_follows_the_measured_sensitivity():
    from splitkernels.codec.calibrate import DECODE_FRAME_BITS, DEFAULT_BITS, DEFAULT_KL_PROXY, default_bits_ceiling

    # The ceiling leaves a one-token frame (10 bytes of tag, escape count, CRC and rANS state) near DECODE_FRAME_BITS.
    assert default_bits_ceiling(640) == pytest.approx(DECODE_FRAME_BITS - 8 * 10 / 640, abs=0.02)
    assert default_bits_ceiling(16) == DEFAULT_BITS < default_bits_ceiling(576) < default_bits_ceiling(4096) < DECODE_FRAME_BITS
    h = activations(1000, 640, seed=6)
    assert calibrate(h).info["target_bits"] == DEFAULT_BITS  # no sensitivity: a fixed rate
    for scale, capped in ((2e-4, False), (1e3, True)):
        # An insensitive layer meets the KL target at a low rate; a sensitive one stops at the ceiling.
        cfg = calibrate(h, sensitivity=torch.full((640,), scale))
        assert cfg.info["max_kl_proxy"] == DEFAULT_KL_PROXY
        assert cfg.info["estimated_bits"] <= default_bits_ceiling(640) + 1e-6
        if capped:
            assert cfg.info["kl_proxy"] > DEFAULT_KL_PROXY
            assert cfg.info["estimated_bits"] == pytest.approx(default_bits_ceiling(640), abs=0.01)
        else:
            assert cfg.info["kl_proxy"] <= DEFAULT_KL_PROXY and cfg.info["estimated_bits"] < 3.8


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=0.5), "bits"), (dict(max_kl_proxy=-1.0, sensitivity=torch.ones(8)), "max_kl_proxy"),
    (dict(max_kl_proxy=0.01), "sensitivity"), (dict(sensitivity=torch.ones(7)), "sensitivity"),
    (dict(base="x"), "base"),
])
def test_calibrate_rejects_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        calibrate(torch.randn(32, 8), **kwargs)
    with pytest.raises(ValueError, match="hidden"):
        calibrate(torch.randn(8))
    with pytest.raises(ValueError, match="finite"):
        calibrate(torch.full((4, 8), float("nan")))


# ---------------------------------------------------------------- encode / decode / frames


@pytest.fixture(scope="module")
def cfg64() -> CodecConfigV2:
    return calibrate(activations(1000, 64, seed=9, massive=800.0), bits=4.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t", [1, 2, 13])
def test_encode_decode_frame_round_trip(cfg64, dtype, t):
    x = activations(t + 1, 64, seed=t, massive=800.0)[1:] if t > 1 else activations(2, 64, seed=t)[1:]
    if t == 13:
        x[4] = x[4] * 40.0 + 3000.0  # a sink in the middle: travels raw
    x = x.to(dtype)
    enc = encode(x, cfg64)
    assert isinstance(enc, EncodedV2)
    y = decode(enc)
    assert y.dtype == dtype and y.shape == x.shape
    data = enc.to_bytes()
    back = from_bytes(data, config=cfg64)
    assert torch.equal(back.symbols, enc.symbols) and torch.equal(back.raw, enc.raw)
    assert torch.equal(decode(back), y)
    esc = enc.symbols == cfg64.escape_symbol
    assert torch.equal(y[esc], x[esc]) and torch.equal(y[enc.raw], x[enc.raw])
    if t == 13:
        assert bool(enc.raw[4])
    # Every other value is within half a step (plus the dtype's rounding of the result).
    coded = ~esc & ~enc.raw[:, None]
    bound = torch.tensor(cfg64.step_array()) * 0.5 + x.float().abs() * 2**-7 + 1e-6
    assert ((y.float() - x.float()).abs() <= bound.expand_as(x))[coded].all()


def test_reference_decode_follows_the_formula(cfg64):
    x = activations(9, 64, seed=11)[1:]
    enc = encode_v2(x, cfg64)
    step, center = torch.tensor(cfg64.step_array()), torch.tensor(cfg64.center_array())
    v = (x - center) * torch.tensor(cfg64.inv_step_array())
    k = cfg64.kmax
    expect_sym = torch.where(v.abs() > k, torch.tensor(2 * k + 1.0), torch.round(v.clamp(-k, k)) + k).to(torch.uint8)
    assert torch.equal(enc.symbols, expect_sym)
    q = expect_sym.int() - k
    y = decode_v2(enc)
    plain = (q.float() * step) + center
    esc = expect_sym == 2 * k + 1
    assert torch.equal(y[~esc], plain[~esc]) and torch.equal(y[esc], x[esc])


def test_one_token_frame_framing_is_at_most_a_quarter_bit_at_d576():
    cfg = calibrate(activations(600, 576, seed=12), bits=4.0)
    x = activations(3, 576, seed=13)[1:2].half()
    enc = encode(x, cfg)
    data = enc.to_bytes()
    payload = len(rans.encode(enc.symbols.numpy(), cfg.freqs)) + 2 * enc.escapes.numel()
    framing_bits = 8 * (len(data) - payload)
    assert framing_bits / 576 <= 0.25
    assert enc.bits_per_element < 5.0


def test_v2_frames_need_the_matching_config(cfg64):
    data = encode(activations(4, 64)[1:].half(), cfg64).to_bytes()
    with pytest.raises(FrameError, match="needs the session"):
        from_bytes(data)
    other = calibrate(activations(500, 64, seed=99), bits=4.0)
    with pytest.raises(FrameError, match="codec config"):
        from_bytes(data, config=other)
    with pytest.raises(FrameError, match="CodecConfigV2"):
        from_bytes(data, config=CodecConfig())


def test_v1_frames_still_decode_through_the_dispatch(cfg64):
    x = torch.randn(5, 64).half()
    enc = encode(x, CodecConfig())
    data = enc.to_bytes()
    for cfg in (None, cfg64):
        back = from_bytes(data, config=cfg)
        assert torch.equal(decode(back), decode(enc))


def test_encode_rejects_bad_input(cfg64):
    with pytest.raises(ValueError, match="d = 64"):
        encode(torch.randn(2, 63), cfg64)
    with pytest.raises(ValueError, match="finite"):
        encode(torch.full((2, 64), float("inf")), cfg64)


# ---------------------------------------------------------------- fuzzing


def _parse_or_frame_error(data: bytes, cfg: CodecConfigV2) -> None:
    try:
        enc = from_bytes(data, config=cfg)
    except FrameError:
        return
    y = decode(enc)
    # Bounded allocation: the decoded tensor is a small multiple of the frame's own size.
    assert y.numel() * y.element_size() <= 64 * len(data) + 1024


def test_fuzz_truncations_and_bit_flips(cfg64):
    x = activations(6, 64, seed=21, massive=800.0)[1:].half()
    x[2] *= 40.0
    data = encode(x, cfg64).to_bytes()
    for bad in (*truncations(data), *bit_flips(data, 300, seed=0)):
        with pytest.raises(FrameError):
            from_bytes(bad, config=cfg64)


def test_fuzz_resealed_mutations_raise_only_frame_error(cfg64):
    x = activations(6, 64, seed=22, massive=800.0)[1:].float()
    x[3] *= 500.0
    data = encode(x, cfg64).to_bytes()
    body = data[:-4]
    rng = np.random.default_rng(1)
    for _ in range(400):
        bad = bytearray(body)
        kind = int(rng.integers(3))
        if kind == 0:
            bad[int(rng.integers(len(bad)))] = int(rng.integers(256))
        elif kind == 1:
            del bad[int(rng.integers(len(bad)))]
        else:
            bad.insert(int(rng.integers(len(bad) + 1)), int(rng.integers(256)))
        _parse_or_frame_error(reseal(bytes(bad), cfg64), cfg64)


def test_fuzz_forged_headers_cannot_force_large_allocations(cfg64):
    x = activations(3, 64, seed=23)[1:].half()
    data = encode(x, cfg64).to_bytes()
    head = data[: HEAD.size]
    rest = data[HEAD.size + 2 : -4]  # after T and escape varints (both one byte here)
    for t in (3, 255, 1 << 20, (1 << 24) + 1, (1 << 35) - 1):
        for n_esc in (0, 1, 1 << 30):
            from splitkernels.codec.frame_v2 import _varint

            forged = reseal(head + _varint(t) + _varint(n_esc) + rest, cfg64)
            _parse_or_frame_error(forged, cfg64)
    # A claimed huge T with a tiny stream is refused before anything T-sized is allocated.
    forged = reseal(head + _varint(1 << 24) + _varint(0) + bytes((1 << 24) // 8) + b"\1" * 8, cfg64)
    with pytest.raises(FrameError, match="stream can hold"):
        from_bytes(forged, config=cfg64)
    for version_or_dtype in ((b"SKTQ", 3, 1), (b"SKTQ", 2, 9), (b"SKTX", 2, 1)):
        magic, version, dtype = version_or_dtype
        forged = reseal(HEAD.pack(magic, version, dtype) + data[HEAD.size : -4], cfg64)
        with pytest.raises(FrameError):
            from_bytes(forged, config=cfg64)


@pytest.mark.parametrize("kind", ["coded", "raw"])
def test_fuzz_token_form(cfg64, kind):
    """One-token frames (the token form, docs/FORMATS.md §5.4.1): every truncation, bit flips, every
    tag value and forged escape counts under a valid CRC, and resealed mutations raise only
    FrameError or decode within the allocation bound."""
    from splitkernels.codec.frame_v2 import _varint, is_token_tag

    x = activations(2, 64, seed=24, massive=800.0)[1:]
    if kind == "raw":
        x *= 60.0  # more escapes than raw_limit (fp16 still finite)
    x = x.half()
    data = encode(x, cfg64).to_bytes()
    assert is_token_tag(data[0]) and bool(data[0] & 0x04) == (kind == "raw")
    for bad in (*truncations(data), *bit_flips(data, 200, seed=1)):
        with pytest.raises(FrameError):
            from_bytes(bad, config=cfg64)
    body = data[:-4]
    for tag in range(0xA0, 0xC0):
        _parse_or_frame_error(reseal(bytes([tag]) + body[1:], cfg64), cfg64)
    for n_esc in (0, 1, 64, 65, 1 << 30):
        _parse_or_frame_error(reseal(body[:1] + _varint(n_esc) + body[2:], cfg64), cfg64)
    for bad in byte_mutations(body, 300, seed=2):
        _parse_or_frame_error(reseal(bad, cfg64), cfg64)


# ---------------------------------------------------------------- fused C++ path


@pytest.mark.skipif(not HAS_CPP or not v2mod.has_fused(), reason="C++ extension not built (pip install . builds it)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (17, 64)])
def test_fused_quantise_and_dequantise_match_reference(cfg64, dtype, shape):
    g = torch.Generator().manual_seed(shape[0])
    x = activations(shape[0] + 1, 64, seed=shape[0], massive=800.0)[1:]
    # Exact ties (half steps) and exact escape boundaries exercise rounding and the <= test.
    step, center = torch.tensor(cfg64.step_array()), torch.tensor(cfg64.center_array())
    k = torch.randint(-2 * cfg64.kmax, 2 * cfg64.kmax, x.shape, generator=g).float() / 2
    ties = center + k * step
    x = torch.where(torch.rand(x.shape, generator=g) < 0.3, ties, x)
    x[0, :40] *= 50.0  # a raw token
    x = x.to(dtype)
    for fused in (True, False):
        sym, raw = v2mod.quantise(x, cfg64, fused=fused)
        if fused:
            sym_f, raw_f = sym, raw
    assert torch.equal(sym_f, sym) and torch.equal(raw_f, raw)
    assert torch.equal(v2mod.dequantise(sym, cfg64, dtype, fused=True), v2mod.dequantise(sym, cfg64, dtype, fused=False))


v2_isa = isa_fixture("v2", "v2_isa", "the fused v2 passes")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t, d, kmax", [(1, 1, 11), (3, 31, 11), (4, 32, 11), (5, 45, 11), (2, 100, 11), (3, 200, 127)])
def test_fused_passes_match_reference_on_every_isa(v2_isa, dtype, t, d, kmax):
    """Odd widths (vector tails), ties, escape boundaries, tiny values near the fp16/bf16 subnormal
    range and a raw token: the fused encode/decode equal the reference bit for bit on each ISA."""
    g = torch.Generator().manual_seed(1000 * t + d)
    center = torch.randn(d, generator=g) * 0.01
    step = torch.rand(d, generator=g) * 0.05 + 1e-3
    step[0] = 3e-7  # a channel whose codes land on fp16 subnormals when decoded
    freqs = rans.build_freqs(np.ones(2 * kmax + 2))
    cfg = CodecConfigV2(center=tuple(center.tolist()), step=tuple(step.tolist()), kmax=kmax, freqs=freqs,
                        raw_limit=d // 3)
    st, ce = torch.tensor(cfg.step_array()), torch.tensor(cfg.center_array())
    k = torch.randint(-2 * kmax - 4, 2 * kmax + 5, (t + 1, d), generator=g).float() / 2  # ties and escapes
    x = ce + k * st
    x = torch.where(torch.rand(x.shape, generator=g) < 0.5, x + torch.randn(x.shape, generator=g) * st, x)
    x[:, 0] = torch.randn(t + 1, generator=g) * 1e-6
    x[-1] = x[-1] * 1e4 + 50.0  # every value escapes: a raw token
    x = x.to(dtype)
    sym_ref, raw_ref = v2mod.quantise(x, cfg, fused=False)
    sym, raw = v2mod.quantise(x, cfg, fused=True)
    assert torch.equal(sym, sym_ref) and torch.equal(raw, raw_ref) and bool(raw[-1])
    enc = encode_v2(x, cfg)
    assert torch.equal(enc.escapes, x[~raw][sym_ref[~raw] == cfg.escape_symbol])
    assert torch.equal(v2mod.dequantise(sym, cfg, dtype, fused=True), v2mod.dequantise(sym, cfg, dtype, fused=False))
    back = from_bytes(enc.to_bytes(), config=cfg)
    y = decode_v2(back)
    ref = v2mod.dequantise(sym_ref, cfg, dtype, fused=False)
    esc = sym_ref == cfg.escape_symbol
    ref[esc] = x[esc]
    ref[raw_ref] = x[raw_ref]
    assert torch.equal(y.view(torch.uint8), ref.view(torch.uint8))


def test_fused_encode_rejects_non_finite_values(cfg64, v2_isa):
    for bad in (float("nan"), float("inf")):
        x = activations(4, 64, seed=1)[1:].half()
        x[1, 37] = bad
        with pytest.raises(ValueError, match="finite"):
            encode(x, cfg64)


@pytest.mark.parametrize("coder", ["nibble", "planes", "slots"])
def test_fused_frames_reject_non_finite_values_and_match_the_general_path(cfg64, v2_isa, coder):
    # The fused coders' frames come from one C++ call (csrc/cpu/long_frame.cpp): byte for byte the
    # general path's, raw tokens and escapes included, and NaN/Inf anywhere (a raw token too) refused.
    x = activations(9, 64, seed=3, massive=800.0)[1:].half()
    x[2] += 5000.0  # a raw token: every value escapes
    for t in (1, 2, 8):
        want = encode(x[:t], cfg64).to_bytes(coder)
        assert encode_frame(x[:t], cfg64, coder) == want
        assert torch.equal(decode_frame(want, config=cfg64).view(torch.uint8),
                           decode(from_bytes(want, config=cfg64)).view(torch.uint8))
    for row, bad in ((1, float("nan")), (2, float("inf")), (5, -float("inf"))):
        y = x.clone()
        y[row, 37] = bad
        with pytest.raises(ValueError, match="finite"):
            encode_frame(y, cfg64, coder)


@pytest.mark.parametrize("coder", ["nibble", "planes", "slots"])
def test_one_call_decoder_accepts_only_what_the_reference_accepts(cfg64, coder, monkeypatch):
    # Resealed single-bit flips anywhere in a fused coder's frame (header, bitmap, escapes, raw
    # token, stream) and frames under receiver limits: whatever the one-call C++ decoder accepts,
    # the reference parser accepts with the same bits; what it declines, the reference decides.
    if not v2mod.has_fused():
        pytest.skip("C++ extension not built (pip install . builds it)")
    x = activations(13, 64, seed=5, massive=800.0)[1:].half()
    x[4] += 5000.0  # a raw token
    data = encode_frame(x, cfg64, coder)
    assert wire_v2._decode_fused_frame(data, cfg64, None) is not None

    def reference(frame, limits=None):
        with monkeypatch.context() as m:
            m.setattr(wire_v2, "_decode_fused_frame", lambda *a: None)
            return wire_v2.decode_frame_v2(frame, cfg64, limits)

    rng = np.random.default_rng(7)
    body = data[:-4]
    accepted = declined = 0
    for _ in range(400):
        bad = bytearray(body)
        i = int(rng.integers(len(bad)))
        bad[i] ^= 1 << int(rng.integers(8))
        frame = reseal(bytes(bad), cfg64)
        fast = wire_v2._decode_fused_frame(frame, cfg64, None)
        if fast is None:
            declined += 1
            continue
        accepted += 1
        assert torch.equal(fast.view(torch.uint8), reference(frame).view(torch.uint8))
    assert accepted > 20 and declined > 20
    n_esc = encode(x, cfg64).escapes.numel()
    for limits, ok in ((FrameLimits(max_tokens=12, max_outliers=n_esc), True), (FrameLimits(max_tokens=11), False),
                       (FrameLimits(max_outliers=n_esc - 1), False), (FrameLimits(d=65), False),
                       (FrameLimits(dtypes={torch.bfloat16}), False)):
        assert (wire_v2._decode_fused_frame(data, cfg64, limits) is not None) == ok
        if not ok:
            with pytest.raises(FrameError):
                reference(data, limits)


def test_long_frame_encoder_refuses_what_has_no_frame(cfg64):
    if not v2mod.has_fused():
        pytest.skip("C++ extension not built (pip install . builds it)")
    x = activations(2, 64, seed=3).half()
    args = cfg64.fused_frame_args["slots"]
    with pytest.raises(ValueError, match="one-token frame cannot carry"):
        wire_v2._C.v2_encode_long_frame(x.data_ptr(), 1, 1, 64, 5, *args)
    with pytest.raises(ValueError, match="coder must be"):
        wire_v2._C.v2_encode_long_frame(x.data_ptr(), 1, 2, 64, 3, *args)
    with pytest.raises(ValueError, match="out of range"):
        wire_v2._C.v2_encode_long_frame(x.data_ptr(), 7, 2, 64, 5, *args)


def test_fused_decode_checks_the_escape_count(cfg64):
    if not v2mod.has_fused():
        pytest.skip("C++ extension not built (pip install . builds it)")
    enc = encode(activations(6, 64, seed=4, massive=800.0)[1:].half(), cfg64)
    assert enc.escapes.numel() > 0
    for escapes in (enc.escapes[:-1], torch.cat([enc.escapes, enc.escapes[:1]])):
        with pytest.raises(ValueError, match="escape"):
            decode_v2(EncodedV2(enc.symbols, enc.raw, escapes, enc.raw_values, cfg64))


def test_rans_tables_are_built_once_per_table():
    if not rans.has_native():
        pytest.skip("C++ extension not built (pip install . builds it)")
    freqs = rans.build_freqs(np.arange(1, 9))
    tables = rans.as_class_tables(freqs)
    assert tables is rans.as_class_tables(tuple(freqs))
    assert tables.native is tables.native
    with pytest.raises(ValueError, match="sum"):
        rans.as_class_tables((1, 2, 3))


def test_rans_channel_pointers_name_the_class_tables():
    """`native` (per channel, what the coders index) and `native_classes` (per class, what the token
    frame loads into the cache ahead of a cold decode) name the same tables."""
    if not rans.has_native():
        pytest.skip("C++ extension not built (pip install . builds it)")
    freqs = [tuple(int(v) for v in rans.build_freqs(np.arange(1, 9) ** k)) for k in (1, 2, 3)]
    tables = rans.ClassTables(tuple(freqs), (2, 0, 0, 1, 2, 2, 1))
    classes = tables.native_classes
    assert classes.shape == (3,) and len(set(classes.tolist())) == 3
    assert tables.native.tolist() == [classes[k] for k in tables.table_of]
    assert not tables.native.flags.writeable and not classes.flags.writeable
