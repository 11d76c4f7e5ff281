"""Codec v2 position shifts: finer steps for early positions, their residual section, the version-4
config layout and calibration from a per-position Fisher profile (docs/FORMATS.md §5.1, §5.2, §5.4)."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from splitkernels.codec import CodecConfigV2, FrameError, calibrate, decode, decode_frame, encode, from_bytes
from splitkernels.codec.calibrate import SINK_BANDS, SINK_FLOOR_MIN, _shift_costs, position_shifts
from splitkernels.codec.config_v2 import MAX_POSITION_BANDS, MAX_SHIFT, position_band
from splitkernels.codec.frame_v2 import HEAD, SHIFTED_FLAG, TOKEN_SHIFTED
from splitkernels.codec.wire_v2 import decode_frame_v2, encode_frame_v2
from v2_frames import bit_flips, reseal, truncations

D = 48
SHIFTS = (0, 3, 2, 2, 1)  # bands 0..4: position 0 unshifted, then 1, 2-3, 4-7, 8-15; 16 on plain


def hidden_states(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g) * torch.linspace(0.2, 3.0, D)
    x[:, 5] += 40.0  # a channel with a large constant part
    return x


@pytest.fixture(scope="module")
def plain() -> CodecConfigV2:
    return calibrate(hidden_states(1500, 0), bits=3.5)


@pytest.fixture(scope="module")
def shifted(plain) -> CodecConfigV2:
    return _with_shifts(plain, SHIFTS)


def _with_shifts(cfg: CodecConfigV2, shifts: tuple[int, ...]) -> CodecConfigV2:
    d = cfg.to_dict()
    d.pop("fingerprint")
    d["version"], d["position_shift"] = 4, list(shifts)
    return CodecConfigV2.from_dict(d)


def reference(x: torch.Tensor, cfg: CodecConfigV2, start: int) -> torch.Tensor:
    """The spec (§5.2) written out per value: fine code ``rint(v * 2**s)``, value
    ``fp32(fp32(fine * fp32(step * 2**-s)) + center)``; escapes exact; raw tokens exact."""
    out = torch.empty_like(x)
    step, center = torch.tensor(cfg.step_array()), torch.tensor(cfg.center_array())
    inv = torch.tensor(cfg.inv_step_array())
    table = list(cfg.position_shift) + [0]
    for t in range(x.shape[0]):
        s = table[min(position_band(start + t), len(table) - 1)]
        v = (x[t].float() - center) * inv
        esc = ~(v.abs() <= cfg.kmax)
        if int(esc.sum()) > cfg.raw_limit:
            out[t] = x[t]
            continue
        fine = torch.round(v.clamp(-cfg.kmax, cfg.kmax) * 2.0**s)
        value = (fine * (step * 2.0**-s) + center).to(x.dtype)
        out[t] = torch.where(esc, x[t], value)
    return out


def test_position_bands_and_row_shifts(shifted):
    assert [position_band(p) for p in (0, 1, 2, 3, 4, 7, 8, 15, 16, 1 << 20)] == [0, 1, 2, 2, 3, 3, 4, 4, 5, 21]
    assert shifted.shift_end == 16
    assert shifted.row_shifts(0, 20).tolist() == [0, 3, 2, 2, 2, 2, 2, 2] + [1] * 8
    assert shifted.row_shifts(6, 3).tolist() == [2, 2, 1]
    assert shifted.row_shifts(16, 5).tolist() == [] and shifted.row_shifts(500, 1).tolist() == []
    assert CodecConfigV2.from_dict(shifted.to_dict()) == shifted
    assert CodecConfigV2.from_canonical_bytes(shifted.canonical_bytes()) == shifted
    assert shifted.canonical_bytes()[0] == 4 and shifted.fingerprint != _with_shifts(shifted, (1,)).fingerprint


@pytest.mark.parametrize("shifts, match", [
    ((1,) * (MAX_POSITION_BANDS + 1), "position_shift"), ((MAX_SHIFT + 1,), "position_shift"),
    ((2, 0), "end in 0"), ((-1, 1), "position_shift"), ((True,), "position_shift"),
])
def test_config_rejects_bad_shifts(plain, shifts, match):
    with pytest.raises(ValueError, match=match):
        _with_shifts(plain, shifts)


def test_config_rejects_shifts_that_make_a_step_subnormal():
    with pytest.raises(ValueError, match="subnormal"):
        CodecConfigV2(center=(0.0,), step=(2.0**-124,), kmax=1, freqs=(4096, 8192, 4095, 1), raw_limit=1, position_shift=(3,))


def test_canonical_bytes_reject_bad_band_counts(shifted):
    data = bytearray(shifted.canonical_bytes())
    for bad in (bytes(data[:-1]), bytes(data) + b"\0", bytes(data[:-6]) + b"\0"):
        with pytest.raises(ValueError):
            CodecConfigV2.from_canonical_bytes(bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("start, t", [(0, 20), (0, 1), (1, 1), (3, 6), (7, 12), (15, 2), (16, 3), (1000, 1)])
def test_round_trip_follows_the_spec(plain, shifted, dtype, start, t):
    x = hidden_states(t, seed=start * 31 + t).to(dtype)
    x[0, 7] = 900.0  # an escape in the first row
    if t > 4:
        x[3] *= 300.0  # a raw token inside the shifted rows
    enc = encode(x, shifted, start=start)
    want = reference(x, shifted, start)
    assert torch.equal(decode(enc).view(torch.uint8), want.view(torch.uint8))
    for coder in ("rans", "nibble"):
        data = enc.to_bytes(coder)
        assert torch.equal(decode(from_bytes(data, config=shifted)).view(torch.uint8), want.view(torch.uint8))
        assert torch.equal(decode_frame_v2(data, shifted).view(torch.uint8), want.view(torch.uint8))
        assert torch.equal(decode_frame(data, config=shifted).view(torch.uint8), want.view(torch.uint8))  # server path
        assert encode_frame_v2(x, shifted, coder, start) == data
    shifted_rows = shifted.row_shifts(start, t)
    assert (enc.residuals is None) == (not shifted_rows.any())
    flag = data[0] & TOKEN_SHIFTED if t == 1 else data[HEAD.size - 1] & SHIFTED_FLAG  # the token form's tag or the dtype byte
    assert bool(flag) == bool(shifted_rows.any())
    if not shifted_rows.any():  # late rows code exactly as without shifts
        assert torch.equal(decode(enc), decode(encode(x, plain, start=start)))
        assert len(enc.to_bytes()) == len(encode(x, plain).to_bytes())


def test_shifted_rows_cost_their_shift_in_bits_and_cut_the_error(plain, shifted):
    x = hidden_states(16, seed=5).half()
    fine, coarse = encode(x, shifted, start=0), encode(x, plain, start=0)
    extra_bits = 8 * (len(fine.to_bytes()) - len(coarse.to_bytes()))
    want = sum(shifted.row_shifts(0, 16).tolist()) * D
    assert want - 16 <= extra_bits <= want + 8 * 6 + 0.15 * want  # + start varint, padding, coarse-code noise
    err = [(decode(e).float() - x.float()).pow(2).sum(1) for e in (fine, coarse)]
    assert (err[0][1:] < err[1][1:]).all()  # every shifted row is reconstructed closer


def test_encode_rejects_bad_start(shifted):
    x = hidden_states(2, seed=1)
    for bad in (-1, 1.5, True, 1 << 40):
        with pytest.raises(ValueError, match="start"):
            encode(x, shifted, start=bad)


def test_fuzz_shifted_frames(shifted, plain):
    x = hidden_states(12, seed=8).half()
    x[0, 2] = 700.0
    data = encode(x, shifted, start=2).to_bytes()
    for bad in (*truncations(data), *bit_flips(data, 300, seed=3)):
        with pytest.raises(FrameError):
            from_bytes(bad, config=shifted)
    rng = np.random.default_rng(4)
    body = data[:-4]
    for _ in range(300):  # resealed: decodes to something bounded, or FrameError
        bad = bytearray(body)
        bad[int(rng.integers(len(bad)))] = int(rng.integers(256))
        try:
            y = decode(from_bytes(reseal(bytes(bad), shifted), config=shifted))
        except FrameError:
            continue
        assert y.numel() * y.element_size() <= 64 * len(data) + 1024
    with pytest.raises(FrameError, match="no position or token shifts"):
        from_bytes(reseal(body, plain), config=plain)


def test_residual_at_an_escape_or_in_the_padding_is_rejected(shifted):
    x = hidden_states(1, seed=9).half()
    x[0, 0] = 900.0  # channel 0 escapes; position 1 has shift 3: 3 * 48 = 144 residual bits, 18 bytes
    enc = encode(x, shifted, start=1)
    assert enc.residuals[0, 0] == 0 and enc.escapes.numel() >= 1
    data = bytearray(enc.to_bytes())
    n_esc = enc.escapes.numel()
    at = 1 + 2 + 2 * n_esc  # the token form's tag, start and escape varints, escape values
    bad = bytearray(data[:-4])
    bad[at] ^= 1  # the escape's residual field (the first one)
    with pytest.raises(FrameError, match="escaped value"):
        from_bytes(reseal(bytes(bad), shifted), config=shifted)


def test_padding_bits_of_the_residual_section_are_rejected():
    cfg = CodecConfigV2(center=(0.0,) * 5, step=(1.0,) * 5, kmax=3, freqs=(2000, 2000, 2000, 4000, 2000, 2000, 2000, 384),
                        raw_limit=5, position_shift=(0, 1))
    data = encode(torch.tensor([[0.5, -0.5, 1.0, 0.0, 2.5]]), cfg, start=1).to_bytes()
    at = 1 + 2  # the token form's tag, start and escape varints; 5 residual bits, 3 of padding
    bad = bytearray(data[:-4])
    bad[at] |= 0x80
    with pytest.raises(FrameError, match="padding"):
        from_bytes(reseal(bytes(bad), cfg), config=cfg)


def test_position_shifts_follow_the_profile():
    profile = torch.ones(64)
    profile[0], profile[1], profile[2:4], profile[4:8] = 1e6, 64.0, 16.0, 3.0
    # ratios to the late half: 1e6 -> capped, 64 -> 3, 16 -> 2, 3 -> 0.79 -> 1, 1 -> 0; then every
    # band below SINK_BANDS (positions < 32) is raised to the largest shift of bands 1..5 (3).
    assert SINK_BANDS == 6
    assert position_shifts(profile) == (MAX_SHIFT, 3, 3, 3, 3, 3)
    longer = torch.ones(128)
    longer[:64] = profile
    longer[32:64] = 16.0  # band 6 is past the sink bands: its own shift, and it raises none
    assert position_shifts(longer) == (MAX_SHIFT, 3, 3, 3, 3, 3, 2)
    mild = torch.ones(64)
    mild[1:8] = 16.0  # shift 2 early: under SINK_FLOOR_MIN, no floor (short prompts keep their bits)
    assert SINK_FLOOR_MIN == 3 and position_shifts(mild) == (0, 2, 2, 2)
    lone_sink = torch.ones(64)
    lone_sink[0] = 1e4  # position 0 alone (the usual sink) sets no floor
    assert position_shifts(lone_sink) == (MAX_SHIFT,)
    assert position_shifts(torch.ones(64)) == ()
    assert position_shifts(torch.ones(8) * 5) == ()  # too short a profile
    with pytest.raises(ValueError, match="position_sensitivity"):
        position_shifts(torch.tensor([1.0, float("nan")] * 10))


def test_calibrate_with_a_position_profile_counts_the_residuals():
    h = hidden_states(4 * 64, seed=11)
    profile = torch.ones(64)
    profile[1:8] = 100.0
    fisher = torch.ones(D)
    cfg = calibrate(h, bits=4.0, sensitivity=fisher, position_sensitivity=profile)
    assert cfg.position_shift == position_shifts(profile) and cfg.shift_end == 32
    plain = calibrate(h, bits=4.0, sensitivity=fisher)
    extra = sum(cfg.row_shifts(0, 512).tolist()) / 512
    assert cfg.info["estimated_bits"] <= 4.0 + 1e-9 and cfg.info["estimated_bits"] == pytest.approx(cfg.info["estimated_bits_late"] + extra)
    assert cfg.step_array()[0] > plain.step_array()[0]  # late tokens pay for the finer early ones
    with pytest.raises(ValueError, match="whole windows"):
        calibrate(h[:100], bits=4.0, sensitivity=fisher, position_sensitivity=profile)


def test_shift_costs_weigh_positions_by_their_fisher():
    profile = torch.ones(64)
    profile[1:8] = 100.0
    shifts = position_shifts(profile)  # 0.5 * log2(100) -> 3 for bands 1-3 (positions 1-7), floor to 31
    assert shifts == (3, 3, 3, 3, 3, 3)
    extra, gain = _shift_costs(shifts, profile, sink_first=False)
    assert extra == pytest.approx(32 * 3 / 512)
    # KL proxy factor: positions 1-7 carry 700 of the 756 Fisher weight and, with positions 8-31,
    # get 1/64 of the noise.
    assert gain == pytest.approx((700 / 64 + 24 / 64 + 32) / 756)
    assert _shift_costs((), profile, sink_first=False) == (0.0, 1.0)
    assert _shift_costs((4, 1), profile, sink_first=True)[0] == pytest.approx(1 / 512)  # a raw sink pays no residuals


def test_the_sink_floor_costs_bits_but_leaves_the_late_step(monkeypatch):
    h = hidden_states(4 * 64, seed=12)
    profile = torch.ones(64)
    profile[1:8] = 100.0
    fisher = torch.ones(D)
    floored = calibrate(h, max_kl_proxy=0.01, sensitivity=fisher, position_sensitivity=profile)
    # the module, not the function the package exports under its name
    monkeypatch.setattr(importlib.import_module("splitkernels.codec.calibrate"), "SINK_BANDS", 0)  # no floor
    plain = calibrate(h, max_kl_proxy=0.01, sensitivity=fisher, position_sensitivity=profile)
    assert floored.position_shift == (3, 3, 3, 3, 3, 3) and plain.position_shift == (0, 3, 3, 3)
    assert floored.step_array().tolist() == plain.step_array().tolist()
    assert floored.info["estimated_bits"] > plain.info["estimated_bits"]
