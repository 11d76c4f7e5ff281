"""Frame step scales (docs/FORMATS.md §5.4.3) and per-frame rate control (splitkernels/codec/rate.py):
golden frames, what the parser refuses, and a controller that meets its target on text dearer or
cheaper than its calibration."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_codec_v2_golden import CONFIG, X
from v2_frames import bit_flips, byte_mutations, reseal, truncations

from splitkernels.codec import FrameError, calibrate, decode, decode_frame, encode, encode_frame, from_bytes
from splitkernels.codec import wire_v2
from splitkernels.codec.config_v2 import MAX_FRAME_SCALE, CodecConfigV2, scale_factor
from splitkernels.codec.rate import RateControl, RatePolicy, policy_of, rate_control, session_encoder
from splitkernels.codec.token_frame import decode_token_frame, encode_token_frame, has_native

# The golden config at scale 4 (every step x 2): 0.3 / 1 -> 0, 0.2 / 0.5 -> 0, -3.5 / 2 -> -2 (decodes
# to -6), 1 / 4 -> 0; token 1: 7 + 2 = 9 escapes (4.5 > kmax); token 2 raw. Dtype byte 0x05: fp16 and the scale flag.
SCALED_FRAME = bytes.fromhex("534b54510205040301040047804880c88048a055ff23473f004875f885e3")
# At scale -1 (steps x fp32(2^-0.25) = 0x3f5744fd): token 1 now has three escapes and travels raw.
FINER_FRAME = bytes.fromhex("534b54510205ff03010680c500ba000000470056804880c88048a055ffb32a000074f3a76ba8")
HUGE = CodecConfigV2(center=(0.0,), step=(1e38,), kmax=2, freqs=CONFIG.freqs, raw_limit=1)  # x 4 is not finite
SCALED_TOKEN = bytes.fromhex("c10400002084005570e98e")  # token 0 at scale 4 in the token form: tag 0xc1, scale 04


@pytest.fixture(scope="module")
def cfg64() -> CodecConfigV2:
    gen = torch.Generator().manual_seed(9)
    return calibrate(torch.randn(2000, 64, generator=gen) * (torch.rand(64, generator=gen) * 3 + 0.1), bits=4.0)


def test_scale_factors_are_the_fp32_quarter_octaves():
    assert [float(scale_factor(g)) for g in (-8, -4, 0, 4, 8)] == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert np.float32(scale_factor(-1)).view(np.uint32) == 0x3F5744FD
    assert np.float32(scale_factor(1)).view(np.uint32) == 0x3F9837F0
    for bad in (MAX_FRAME_SCALE + 1, -MAX_FRAME_SCALE - 1, 1.0, True):
        with pytest.raises(ValueError, match="frame scale"):
            scale_factor(bad)


def test_views_share_the_session_identity_and_are_not_configs():
    view = CONFIG.scaled(4)
    assert CONFIG.scaled(0) is CONFIG and CONFIG.scaled(4) is view and view.scaled(-1) is CONFIG.scaled(-1)
    assert view.step == (1.0, 0.5, 2.0, 4.0) and view.frame_scale == 4 and view.base is CONFIG
    assert (view.fingerprint, view.crc_seed) == (CONFIG.fingerprint, CONFIG.crc_seed)
    with pytest.raises(ValueError, match="not a session config"):
        view.to_json()
    with pytest.raises(ValueError, match="frame scale 8 makes a step"):
        HUGE.scaled(8)


def test_golden_scaled_frames():
    enc = encode(X, CONFIG.scaled(4))
    assert enc.symbols[:2].tolist() == [[2, 2, 0, 2], [1, 0, 5, 1]] and enc.escapes.tolist() == [7.0]
    assert enc.to_bytes() == SCALED_FRAME
    assert decode(from_bytes(SCALED_FRAME, config=CONFIG)).tolist() == [
        [0.0, 1.0, -6.0, 100.0], [-1.0, 0.0, 7.0, 96.0], [9.0, -9.0, 9.0, 90.0]]
    finer = encode(X, CONFIG.scaled(-1))
    assert finer.raw.tolist() == [False, True, True] and finer.to_bytes() == FINER_FRAME
    assert encode(X[:1], CONFIG.scaled(4)).to_bytes() == SCALED_TOKEN
    assert decode_frame(SCALED_TOKEN, config=CONFIG).tolist() == [[0.0, 1.0, -6.0, 100.0]]


@pytest.mark.parametrize("t, coder", [(1, "rans"), (1, "nibble"),
                                      *((300, c) for c in ("rans", "nibble", "rice", "planes", "slots"))])
def test_every_path_reads_and_writes_scaled_frames_alike(cfg64, t, coder):
    x = (torch.randn(t, 64) * 2).half()
    for scale in (-3, 2):
        view = cfg64.scaled(scale)
        frame = encode_frame(x, view, coder)
        enc = encode(x, view)
        assert frame == enc.to_bytes(coder)
        expect = decode(enc)
        assert torch.equal(decode_frame(frame, config=cfg64), expect)
        assert torch.equal(decode(from_bytes(frame, config=cfg64)), expect)
        assert from_bytes(frame, config=cfg64).config is view


def test_parser_refuses_bad_scale_bytes():
    body = bytearray(SCALED_FRAME[:-4])
    for value, match in ((0, "step scale 0"), (9, "step scale 9"), (0xF7, "step scale -9")):
        body[6] = value
        with pytest.raises(FrameError, match=match):
            from_bytes(reseal(bytes(body), CONFIG), config=CONFIG)
    token = bytearray(SCALED_TOKEN[:-4])
    token[1] = 0
    with pytest.raises(FrameError, match="step scale 0"):
        decode_frame(reseal(bytes(token), CONFIG), config=CONFIG)
    with pytest.raises(FrameError, match="truncated"):
        from_bytes(reseal(bytes([0xC1]), CONFIG), config=CONFIG)
    frame = reseal(bytes([0xC1, 0x08, 0x00]) + b"\x00" * 4, HUGE)
    with pytest.raises(FrameError, match="makes a step"):
        decode_frame(frame, config=HUGE)


def test_resealed_scale_mutations_raise_only_frame_error(cfg64):
    frame = encode_frame(torch.randn(40, 64).half(), cfg64.scaled(3))
    for value in range(256):
        bad = bytearray(frame[:-4])
        bad[6] = value
        try:
            out = decode_frame(reseal(bytes(bad), cfg64), config=cfg64)
        except FrameError:
            continue
        assert out.shape == (40, 64)


# ---------------------------------------------------------------- rate control

@pytest.fixture(scope="module")
def calibrated():
    """A config from the default rule (a KL target within the ceiling) on heavy-tailed data."""
    gen = torch.Generator().manual_seed(5)
    scale = torch.rand(96, generator=gen) * 3 + 0.2
    hidden = torch.distributions.StudentT(5.0).sample((4096, 96)) * scale
    sens = torch.rand(96, generator=gen) + 0.5
    cfg = calibrate(hidden, sensitivity=sens, max_kl_proxy=1e-6, bits="ceiling")
    return cfg, scale


def _session(cfg: CodecConfigV2, x: torch.Tensor, policy: RatePolicy) -> tuple[RateControl, bytes, list[bytes]]:
    rate = RateControl(cfg, policy)
    long_frame = rate.encode_frame(x[:256])
    return rate, long_frame, [rate.encode_frame(x[t : t + 1], start=t) for t in range(256, x.shape[0])]


def test_controller_meets_the_target_on_dearer_and_cheaper_text(calibrated):
    cfg, scale = calibrated
    policy = RatePolicy(4.4, -MAX_FRAME_SCALE)
    mean_scale = {}
    for spread in (1.6, 0.6):
        x = (torch.distributions.StudentT(5.0).sample((1024, 96)) * scale * spread).half()
        rate, long_frame, frames = _session(cfg, x, policy)
        assert 8 * len(long_frame) <= policy.bits * 256 * 96
        bits = 8.0 * sum(map(len, frames[256:])) / (len(frames[256:]) * 96)  # after the first 256 decode steps
        assert abs(bits - policy.bits) < 0.05, (spread, bits)
        plain = 8.0 * sum(len(encode_frame(x[t : t + 1], cfg)) for t in range(512, 1024)) / (512 * 96)
        assert abs(plain - policy.bits) > 0.15  # the calibrated step alone misses it
        mean_scale[spread] = float(np.mean(rate.scales[257:]))
    # The values spread 1.6 / 0.6 = 2^1.42 apart: the steps follow them within a quarter octave or so.
    assert abs(mean_scale[1.6] - mean_scale[0.6] - 4 * np.log2(1.6 / 0.6)) < 1.5, mean_scale


def test_controller_never_goes_finer_than_the_policy_allows(calibrated):
    cfg, scale = calibrated
    x = (torch.distributions.StudentT(5.0).sample((600, 96)) * scale * 0.3).half()  # far cheaper text
    rate, _, frames = _session(cfg, x, RatePolicy(4.4, -2))
    assert min(rate.scales) == -2 and max(rate.scales) <= 0


def test_long_frame_is_the_finest_that_fits(calibrated):
    cfg, scale = calibrated
    x = (torch.distributions.StudentT(5.0).sample((512, 96)) * scale * 1.3).half()
    policy = RatePolicy(4.0, -MAX_FRAME_SCALE)
    rate = RateControl(cfg, policy)
    frame = rate.encode_frame(x)
    (g,) = rate.scales
    assert 8 * len(frame) <= policy.bits * x.numel()
    assert g == -MAX_FRAME_SCALE or 8 * len(encode_frame(x, cfg.scaled(g - 1))) > policy.bits * x.numel()
    assert torch.equal(decode_frame(frame, config=cfg), decode(encode(x, cfg.scaled(g))))


def test_controller_is_deterministic(calibrated):
    cfg, scale = calibrated
    x = (torch.distributions.StudentT(5.0).sample((400, 96)) * scale * 1.2).half()
    policy = RatePolicy(4.2, -4)
    assert _session(cfg, x, policy)[1:] == _session(cfg, x, policy)[1:]


def test_calibrate_stores_a_policy_for_the_default_rule_only(calibrated):
    cfg, _ = calibrated
    policy = policy_of(cfg)
    assert policy is not None and policy.bits == 4.4 and -MAX_FRAME_SCALE <= policy.finest <= 0
    assert CodecConfigV2.from_json(cfg.to_json()).info["rate"] == policy.to_dict()
    explicit = calibrate(torch.randn(2048, 32), bits=4.0)
    assert policy_of(explicit) is None and rate_control(explicit) is None
    x = torch.randn(3, 32)
    assert session_encoder(explicit)(x) == encode_frame(x, explicit)  # no policy: the calibrated step


@pytest.mark.parametrize("kwargs, match", [({"bits": float("nan")}, "rate bits"), ({"bits": 0}, "rate bits"),
                                           ({"finest": 1}, "finest scale"), ({"finest": -9}, "finest scale")])
def test_policy_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RatePolicy(**kwargs)


@pytest.mark.parametrize("entry", [{"bits": 4.4}, {"bits": "4.4", "finest": 0}, {"bits": 4.4, "finest": 0.5}, [4.4, 0]])
def test_a_malformed_stored_policy_is_refused(cfg64, entry):
    cfg = CodecConfigV2.from_dict({**cfg64.to_dict(), "info": {"rate": entry}})
    with pytest.raises(ValueError, match="rate|finest"):
        policy_of(cfg)


def test_controller_needs_a_session_config(cfg64):
    with pytest.raises(TypeError, match="session CodecConfigV2"):
        RateControl(cfg64.scaled(1), RatePolicy())


@pytest.mark.skipif(not has_native(), reason="the one-call C++ token path is part of the extension, not built here")
def test_one_call_token_path_takes_scaled_frames(cfg64):
    """The server's and the edge's one-call paths handle scaled one-token frames themselves (rate
    control scales most decode steps), byte for byte and bit for bit as the reference."""
    x = (torch.randn(1, 64) * 2).half()
    for scale in (-8, -1, 3, 8):
        view = cfg64.scaled(scale)
        frame = encode_token_frame(x, view, start=5)
        assert frame is not None and frame == encode(x, view, start=5).to_bytes()
        out = decode_token_frame(frame, cfg64)
        assert out is not None and torch.equal(out, decode(encode(x, view)))
        bad = bytearray(frame[:-4])
        bad[1] = -scale & 0xFF  # another valid scale: the stream decodes at that one
        assert torch.equal(decode_token_frame(reseal(bytes(bad), cfg64), cfg64),
                           decode(from_bytes(reseal(bytes(bad), cfg64), config=cfg64)))
        bad[1] = 9  # out of range: declined (the reference raises)
        assert decode_token_frame(reseal(bytes(bad), cfg64), cfg64) is None


@pytest.mark.skipif(not wire_v2.has_fused(), reason="the fused long-frame passes are part of the extension, not built here")
@pytest.mark.parametrize("coder", ["nibble", "planes", "slots"])
def test_fused_long_frames_carry_the_scale(cfg64, coder):
    """A scaled prefill frame of a fused coder is written and read in one C++ call each way, the
    same bytes and values as the reference."""
    x = (torch.randn(300, 64) * 2).half()
    for scale in (-5, 2):
        view = cfg64.scaled(scale)
        frame = wire_v2.encode_frame_v2(x, view, coder)
        assert frame == encode(x, view).to_bytes(coder)
        out = wire_v2._decode_fused_frame(frame, cfg64, None)
        assert out is not None and torch.equal(out, decode(encode(x, view)))
        bad = bytearray(frame[:-4])
        bad[6] = 0  # a scale flag with scale 0: declined here, refused by the reference
        assert wire_v2._decode_fused_frame(reseal(bytes(bad), cfg64), cfg64, None) is None
        with pytest.raises(FrameError, match="step scale 0"):
            decode_frame(reseal(bytes(bad), cfg64), config=cfg64)


def test_controller_rejects_bad_input(cfg64):
    rate = RateControl(cfg64, RatePolicy())
    for bad, err, match in ((torch.randn(64), ValueError, "x"), (torch.ones(2, 64, dtype=torch.int32), TypeError, "x"),
                            (torch.randn(0, 64), ValueError, "at least one token"),
                            (torch.randn(2, 63), ValueError, "d = 64")):
        with pytest.raises(err, match=match):
            rate.encode_frame(bad)
    assert rate.scales == [] and rate.level is None  # nothing learnt from a refused frame


def _decodes_within_bounds_or_frame_error(data: bytes, cfg: CodecConfigV2) -> None:
    try:
        y = decode_frame(data, config=cfg)
    except FrameError:
        return
    assert y.numel() * y.element_size() <= 64 * len(data) + 1024  # bounded by the frame's own size


@pytest.mark.parametrize("t", [1, 6])
def test_fuzz_scaled_frames(cfg64, t):
    """Scaled frames (long and token form): every truncation and bit flips raise FrameError; every
    tag or dtype byte, every scale byte and random resealed mutations raise only FrameError or
    decode within the allocation bound."""
    gen = torch.Generator().manual_seed(30 + t)
    x = (torch.randn(t, 64, generator=gen) * 3).half()
    data = encode_frame(x, cfg64.scaled(-3))
    for bad in (*truncations(data), *bit_flips(data, 200, seed=t)):
        with pytest.raises(FrameError):
            decode_frame(bad, config=cfg64)
    body = data[:-4]
    at = 0 if t == 1 else 5  # the tag, or the dtype byte
    for value in range(256):
        for where in (at, at + 1):  # the tag or dtype byte, then the scale byte
            bad = bytearray(body)
            bad[where] = value
            _decodes_within_bounds_or_frame_error(reseal(bytes(bad), cfg64), cfg64)
    for bad in byte_mutations(body, 300, seed=t):
        _decodes_within_bounds_or_frame_error(reseal(bad, cfg64), cfg64)


@pytest.mark.parametrize("rated", [True, False])
def test_session_encoder_sends_the_wire_dtype(cfg64, rated):
    """A session's frames of fp32 hidden states in fp16: the bytes of the same session fed the cast
    tensors, one-token frames (cast inside the C++ call) and prompt frames alike."""
    gen = torch.Generator().manual_seed(3)
    steps = [torch.randn(5, 64, generator=gen) * 2] + [torch.randn(1, 64, generator=gen) * 2 for _ in range(6)]
    ours, cast = session_encoder(cfg64, rated, torch.float16), session_encoder(cfg64, rated)
    pos = 0
    for x in steps:
        assert ours(x, None, pos) == cast(x.half(), None, pos)
        pos += x.shape[0]
