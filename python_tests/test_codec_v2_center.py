"""Center offsets of long v2 frames (docs/FORMATS.md §5.4.2): the encoder's rule, the section, every
coder's round trip, the parser's checks and a golden frame."""
from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
import torch

from splitkernels.codec import CodecConfigV2, FrameError, decode, decode_frame, encode, encode_frame, from_bytes
from splitkernels.codec import frame_center, rans
from splitkernels.codec.frame_v2 import CENTER_FLAG, CRC_BYTES, FRAME_CODERS, HEAD, crc32
from splitkernels.codec.v2 import has_fused, quantise
from splitkernels.codec.wire_v2 import _decode_fused_frame

from isa_switch import isa_fixture
from test_codec_v2_golden import CONFIG

v2_isa = isa_fixture("v2", "v2_isa", "the fused v2 passes (and the offsets' count pass)")


def _drifted(t: int, d: int, offsets, seed: int = 0, dtype=torch.float16) -> tuple[CodecConfigV2, torch.Tensor]:
    """A config with unit steps and a tensor whose channel ``c`` centres ``offsets[c]`` steps off it."""
    g = torch.Generator().manual_seed(seed)
    peaked = np.exp(-np.abs(np.arange(32) - 15) / 1.5) * 1e6 + 1  # codes near 0, as calibrated tables are
    peaked[31] = 1  # the escape
    cfg = CodecConfigV2(center=(0.0,) * d, step=(0.25,) * d, kmax=15, freqs=rans.build_freqs(peaked), raw_limit=d // 4)
    x = (torch.randn(t, d, generator=g) * 1.5 + torch.tensor(offsets, dtype=torch.float32)) * 0.25
    return cfg, x.to(dtype)


@pytest.mark.parametrize("fit", [frame_center.fit_reference, frame_center.fit], ids=["reference", "fit"])
def test_fit_is_the_lower_median_of_the_coded_sampled_tokens(fit, v2_isa):
    rng = np.random.default_rng(1)
    cases = ((1, 3, 1), (64, 37, 15), (65, 8, 127), (10, 5, 4), (80, 130, 15), (255, 67, 7), (256, 9, 15), (3, 64, 15))
    for n, d, kmax in cases:
        for spread in (2 * kmax + 2, 20):  # every symbol, and symbols near kmax (offsets inside the clip)
            lo = max(0, kmax - spread // 2)
            sym = rng.integers(lo, min(2 * kmax + 2, lo + spread), size=(n, d), dtype=np.uint8)
            raw = rng.random(n) < 0.2
            got = fit(sym, raw, kmax)
            coded = sym[~raw].astype(np.int64)
            if coded.shape[0] == 0:
                assert got is None
                continue
            want = np.clip(np.array([sorted(col)[(len(col) - 1) // 2] for col in coded.T]) - kmax, -8, 7)
            assert (np.zeros(d) if got is None else got).tolist() == want.tolist(), (n, d, kmax, spread)
    assert fit(np.full((4, 3), 15, np.uint8), np.zeros(4, bool), 15) is None  # all at kmax: none
    assert fit(np.full((4, 3), 9, np.uint8), np.ones(4, bool), 15) is None  # no coded token: none
    assert fit(np.full((4, 3), 9, np.uint8), np.array([1, 1, 0, 1], bool), 15).tolist() == [-6] * 3


def test_fit_rejects_mismatched_raw_flags():
    if frame_center._C is None:
        pytest.skip("the C++ extension is not built: fit is the reference")
    with pytest.raises(ValueError, match="raw must hold one flag per sampled token"):
        frame_center.fit(np.zeros((4, 3), np.uint8), np.zeros(5, bool), 15)
    with pytest.raises(ValueError, match="rows must be in"):
        frame_center._C.v2_fit_offsets(0, 0, 256, 3, 15, 0)


def test_sample_rows():
    assert frame_center.sample_rows(256).tolist() == list(range(0, 256, 4))
    assert frame_center.sample_rows(100).tolist() == list(range(100))
    assert frame_center.sample_rows(1000).shape[0] == 67  # every 15th


@pytest.mark.parametrize("d", [1, 2, 7, 576])
def test_section_round_trip_and_checks(d):
    rng = np.random.default_rng(d)
    offsets = rng.integers(-8, 8, size=d).astype(np.int8)
    offsets[0] = 7 if d > 1 else -8
    section = frame_center.pack(offsets)
    assert len(section) == frame_center.section_bytes(d)
    got, why = frame_center.unpack(section, d)
    assert why == "" and got.tolist() == offsets.tolist()
    assert frame_center.unpack(bytes(len(section)), d)[1].startswith("center offset section holds only zeros")
    if d % 2:
        bad = section[:-1] + bytes([section[-1] | 0x10])
        assert "padding nibble" in frame_center.unpack(bad, d)[1]


def test_short_frames_carry_no_offsets_and_long_drifted_ones_do(monkeypatch):
    cfg, x = _drifted(512, 16, [0, 3, -5, 7] * 4)
    assert encode(x[: frame_center.MIN_TOKENS - 1], cfg).center_offset is None
    enc = encode(x, cfg)
    rows = frame_center.sample_rows(512)
    sym, raw = quantise(x[rows], cfg, fused=False)
    assert enc.center_offset.tolist() == frame_center.fit_reference(sym.numpy(), raw.numpy(), cfg.kmax).tolist()
    assert enc.center_offset.tolist()[:4] == [0, 3, -5, 7]
    frame = enc.to_bytes()
    assert frame[5] & CENTER_FLAG
    # The point of the offsets: fewer bytes than the same frame coded around the config's center.
    monkeypatch.setattr(frame_center, "MIN_TOKENS", 1 << 30)
    plain = encode(x, cfg)
    assert plain.center_offset is None and len(frame) < 0.95 * plain.nbytes


@pytest.mark.parametrize("coder", FRAME_CODERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_coder_round_trips_offset_frames(coder, dtype):
    cfg, x = _drifted(300, 24, [(c % 11) - 5 for c in range(24)], seed=2, dtype=dtype)
    x[3, :] *= 100  # a raw token
    x[7, 5] = 1000.0  # an escape
    enc = encode(x, cfg)
    assert enc.center_offset is not None and enc.raw[3]
    want = decode(enc)
    assert torch.equal(want[3], x[3]) and want[7, 5] == x[7, 5]
    frame = enc.to_bytes(coder)
    assert encode_frame(x, cfg, coder) == frame  # the one-call writer follows the same rule
    for got in (decode(from_bytes(frame, config=cfg)), decode_frame(frame, config=cfg)):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    if has_fused() and coder in ("nibble", "planes", "slots"):  # the one-call C++ decoder takes these frames
        assert torch.equal(_decode_fused_frame(frame, cfg, None).view(torch.uint8), want.view(torch.uint8))
    # Every value decodes within half a step of the input (the offsets move the center, not the step).
    coded = ~enc.raw
    assert ((want[coded].float() - x[coded].float()).abs() <= 0.125 + 1e-2 * x[coded].float().abs()).all()


@pytest.mark.parametrize("t", [255, 256, 383, 1000])
def test_one_call_encoder_follows_the_rule_at_every_sample_stride(t):
    cfg, x = _drifted(t, 40, [(3 * c) % 17 - 8 for c in range(40)], seed=t)
    x[::7, 3] = 500.0  # escapes in sampled and unsampled tokens
    x[max(1, t // 64)] *= 80  # a raw token, the second sampled one
    enc = encode(x, cfg)
    assert (enc.center_offset is None) == (t < frame_center.MIN_TOKENS)
    if t >= frame_center.MIN_TOKENS:  # the C++ fit (when built) against the plain one on the reference quantiser's codes
        rows = frame_center.sample_rows(t)
        sym, raw = quantise(x[rows], cfg, fused=False)
        want = frame_center.fit_reference(sym.numpy(), raw.numpy(), cfg.kmax)
        assert raw[1] and enc.center_offset.tolist() == want.tolist()
    for coder in ("nibble", "planes", "slots"):
        assert encode_frame(x, cfg, coder) == enc.to_bytes(coder)


def test_reference_and_fused_quantisers_agree_with_offsets():
    cfg, x = _drifted(256, 33, [4] * 33, seed=3, dtype=torch.float32)
    center = frame_center.centers(cfg, np.full(33, 4, np.int8))
    ref_sym, ref_raw = quantise(x, cfg, fused=False, center=center)
    sym, raw = quantise(x, cfg, fused=True, center=center)
    assert torch.equal(sym, ref_sym) and torch.equal(raw, ref_raw)
    assert (ref_sym[~ref_raw] != cfg.escape_symbol).float().mean() > 0.9  # the moved center fits


def test_offsets_are_the_same_on_every_isa(v2_isa):
    # d = 200: three 64-channel blocks (AVX-512) or six of 32 (AVX2) and a tail channel by channel.
    cfg, x = _drifted(1000, 200, [(5 * c) % 19 - 9 for c in range(200)], seed=5, dtype=torch.bfloat16)
    enc = encode(x, cfg)
    rows = frame_center.sample_rows(1000)
    sym, raw = quantise(x[rows], cfg, fused=False)
    assert enc.center_offset.tolist() == frame_center.fit_reference(sym.numpy(), raw.numpy(), cfg.kmax).tolist()
    assert {-8, 7} <= set(enc.center_offset.tolist())  # both clips reached
    assert encode_frame(x, cfg, "slots") == enc.to_bytes("slots")


def _reseal(frame: bytes, cfg: CodecConfigV2) -> bytes:
    body = frame[:-CRC_BYTES]
    return body + struct.pack("<I", crc32([body], cfg.crc_seed))


def test_parser_refuses_bad_sections():
    cfg, x = _drifted(256, 8, [2, -2, 0, 0, 1, 0, 0, 3], seed=4)
    frame = encode(x, cfg).to_bytes()
    at = HEAD.size + 2 + 1 + 32  # header, T varint (2 bytes), escape count varint (1 byte), bitmap
    assert encode(x, cfg).escapes.numel() < 128
    assert frame[at : at + 4] == frame_center.pack(encode(x, cfg).center_offset)
    zeros = _reseal(frame[:at] + bytes(4) + frame[at + 4 :], cfg)
    with pytest.raises(FrameError, match="only zeros"):
        from_bytes(zeros, config=cfg)
    truncated = _reseal(frame[: at + 2], cfg)
    with pytest.raises(FrameError):
        from_bytes(truncated, config=cfg)
    # A center moved past the fp32 range.
    huge = CodecConfigV2(center=(3e38,) * 8, step=(1e38,) * 8, kmax=15, freqs=cfg.freqs, raw_limit=2)
    forged = bytearray(encode(x, cfg).to_bytes())
    forged[at : at + 4] = frame_center.pack(np.array([7, 0, 0, 0, 0, 0, 0, 0], np.int8))
    with pytest.raises(FrameError, match="beyond the fp32 range"):
        from_bytes(_reseal(bytes(forged), huge), config=huge)
    with pytest.raises(FrameError, match="beyond the fp32 range"):
        decode_frame(_reseal(bytes(forged), huge), config=huge)
    # A one-token frame in the long form with the flag (the token form has no such flag).
    long_one = HEAD.pack(b"SKTQ", 2, (1 | CENTER_FLAG)) + bytes([1, 0, 0]) + frame_center.pack(np.ones(8, np.int8))
    with pytest.raises(FrameError, match="one-token frame carries no center offsets"):
        from_bytes(_reseal(long_one + bytes(4), cfg), config=cfg)


# Golden (docs/FORMATS.md §5.4.2): the golden config, 256 tokens ``center + step * (o + r_t)`` with
# o = (1, -1, 0, 2) and r_t = t % 3 - 1: sampled tokens 0, 4, ..., 252; the lower medians give
# offsets (1, -1, 0, 2), the section ``f1 20``.
GOLDEN_X = (torch.tensor(CONFIG.center) + torch.tensor(CONFIG.step)
            * (torch.tensor([1.0, -1.0, 0.0, 2.0]) + (torch.arange(256) % 3 - 1)[:, None])).to(torch.float16)
GOLDEN_SHA256 = "b0d2bab7a04f3d0cf90c755be37bcf4de510522ab033168b6e767ab565e70d67"  # 299 bytes


def test_golden_center_offset_frame():
    enc = encode(GOLDEN_X, CONFIG)
    assert enc.center_offset.tolist() == [1, -1, 0, 2]
    frame = enc.to_bytes()
    assert frame[:9] == b"SKTQ\x02" + bytes([0x01 | CENTER_FLAG, 0x80, 0x02, 0x00])  # fp16, rANS; T 256; no escapes
    assert frame[9:41] == bytes(32) and frame[41:43] == bytes([0xF1, 0x20])  # bitmap, then the section
    assert enc.escapes.numel() == 0 and not enc.raw.any()
    assert hashlib.sha256(frame).hexdigest() == GOLDEN_SHA256, (len(frame), frame.hex())
    assert torch.equal(decode(from_bytes(frame, config=CONFIG)), GOLDEN_X)
    for coder in ("nibble", "planes", "slots"):  # kmax 2: thresholds below symbol 0 in the C++ bisection
        assert encode_frame(GOLDEN_X, CONFIG, coder) == enc.to_bytes(coder)


@pytest.mark.skipif(not has_fused(), reason="the C++ fit needs the extension (pip install . builds it)")
def test_cpp_fit_refuses_bad_arguments_in_one_line():
    from splitkernels.codec.v2 import _C

    cfg, x = _drifted(256, 8, [1] * 8)
    offsets = np.empty(8, np.int8)
    args = (cfg.center_array().ctypes.data, cfg.inv_step_array().ctypes.data)
    for dtype, kmax, t in ((7, 15, 256), (1, 0, 256), (1, 128, 256), (1, 15, -1)):
        with pytest.raises(ValueError, match="v2_center_offsets: unknown dtype, or kmax, T or d out of range"):
            _C.v2_center_offsets(x.data_ptr(), dtype, t, 8, *args, kmax, cfg.raw_limit, offsets.ctypes.data)
