"""The one-token rANS fast path of codec v2 frames (splitkernels/codec/token_frame.py) against the
reference parser and decoder: same bits for every frame it takes, None (and the reference's
FrameError through decode_frame) for everything else."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from splitkernels.codec import (FrameError, FrameLimitError, FrameLimits, calibrate, decode, decode_frame, encode,
                                encode_frame, from_bytes)
from splitkernels.codec import token_frame
from splitkernels.codec.frame import MAGIC
from splitkernels.codec.frame_v2 import (FOUR_LANE_TOKEN_TAG, FOUR_LANES_MIN_SYMBOLS, HEAD, SCALED_FOUR_LANE_TOKEN_TAG,
                                         SCALED_TOKEN_TAG, TOKEN_CODER, TOKEN_RAW, TOKEN_SHIFTED, TOKEN_TAG,
                                         TOKEN_TAG_MASK, _varint, parse_frame_v2, read_frame_v2)
from splitkernels.codec.v2 import decode_v2
from splitkernels.codec.wire_dtype import to_wire
from v2_frames import bit_flips, reseal, truncations

pytestmark = pytest.mark.skipif(not token_frame.has_native(),
                                reason="C++ extension not built (pip install . builds splitkernels._C)")
D = 96


def hidden(n: int, seed: int, d: int = D) -> torch.Tensor:
    """Gaussian tokens with a heavy channel and an offset one (escapes), like a split layer's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, 1] *= 12.0
    x[:, d // 2] += 4.0
    return x


# d = 2048: the writer's four-lane layout (coder 6, FOUR_LANES_MIN_SYMBOLS); below it one lane.
@pytest.fixture(scope="module", params=[(D, 1), (D, 4), (FOUR_LANES_MIN_SYMBOLS, 4)],
                ids=["one-table", "classes", "four-lanes"])
def cfg(request):
    d, classes = request.param
    return calibrate(hidden(800, 0, d), bits=4.0, classes=classes)


def reference(data: bytes, config, limits=None) -> torch.Tensor:
    return decode_v2(read_frame_v2(data, config, limits))


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32 if x.element_size() == 4 else torch.int16)


def one_token(config, seed: int, dtype: torch.dtype, kind: str = "plain") -> tuple[torch.Tensor, bytes]:
    x = hidden(1, seed, config.d)
    if kind == "escapes":
        x[0, :5] *= 200.0
    elif kind == "raw":  # more escapes than raw_limit: the token travels exact
        x[0] *= 500.0
    x = x.to(dtype)
    return x, encode(x, config).to_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["plain", "escapes", "raw"])
def test_same_bits_as_the_reference(cfg, dtype, kind):
    for seed in range(8):
        x, data = one_token(cfg, seed, dtype, kind)
        enc = read_frame_v2(data, cfg)
        assert bool(enc.raw[0]) == (kind == "raw") and (kind != "escapes" or enc.escapes.numel() > 0)
        out = token_frame.decode_token_frame(data, cfg, FrameLimits(d=cfg.d, max_tokens=4))
        ref = reference(data, cfg)
        assert out is not None and out.dtype == dtype and out.shape == (1, cfg.d)
        four = cfg.d >= FOUR_LANES_MIN_SYMBOLS
        assert data[0] & TOKEN_TAG_MASK == (FOUR_LANE_TOKEN_TAG if four else TOKEN_TAG)  # the layout's marker
        assert torch.equal(bits(out), bits(ref))
        # Through the server's entry point, from a view into a larger message as the protocol hands it.
        view = memoryview(b"xx" + data)[2:]
        assert torch.equal(bits(decode_frame(view, FrameLimits(d=cfg.d), "cpu", config=cfg)), bits(ref))


def test_declines_what_it_does_not_cover(cfg):
    x = hidden(3, 5, cfg.d).half()
    two = encode(x[:2], cfg).to_bytes()
    assert token_frame.decode_token_frame(two, cfg) is None
    assert torch.equal(decode_frame(two, config=cfg), reference(two, cfg))  # the general path
    nibble = encode(x[:1], cfg).to_bytes("nibble")
    assert token_frame.decode_token_frame(nibble, cfg) is None
    assert torch.equal(decode_frame(nibble, config=cfg), reference(nibble, cfg))
    assert nibble[0] == TOKEN_TAG | TOKEN_CODER | 1  # the token form, coder 1, fp16
    _, data = one_token(cfg, 1, torch.float16)
    flagged = reseal(bytes([data[0] | TOKEN_SHIFTED]) + data[1:-4], cfg)  # shifted rows: a section it does not know
    assert token_frame.decode_token_frame(flagged, cfg) is None
    # A one-token frame in the long form (magic, version, dtype byte, T, bitmap), as written before
    # the token form existed: the reference reads it, to the same values.
    coder = parse_frame_v2(data, cfg).coder
    long_form = reseal(HEAD.pack(MAGIC, 2, 1 | coder << 4) + _varint(1) + data[1:2] + b"\0" + data[2:-4], cfg)
    assert token_frame.decode_token_frame(long_form, cfg) is None
    assert torch.equal(decode_frame(long_form, config=cfg), reference(data, cfg))
    assert token_frame.decode_token_frame(data, None) is None
    assert token_frame.decode_token_frame(np.frombuffer(data, dtype=np.uint8), cfg) is None  # not bytes
    strided = memoryview(data + data)[::2]
    assert token_frame.decode_token_frame(strided, cfg) is None


def test_without_the_extension_it_declines(cfg, monkeypatch):
    _, data = one_token(cfg, 2, torch.float16)
    monkeypatch.setattr(token_frame, "_C", None)
    assert token_frame.decode_token_frame(data, cfg) is None
    assert torch.equal(decode_frame(data, config=cfg), reference(data, cfg))


def test_limits_are_the_references(cfg):
    _, data = one_token(cfg, 3, torch.float16, "escapes")
    n_esc = read_frame_v2(data, cfg).escapes.numel()
    for limits, field in ((FrameLimits(d=cfg.d + 1), "d"), (FrameLimits(dtypes=frozenset({torch.float32})), "dtype"),
                          (FrameLimits(max_tokens=0), "tokens"), (FrameLimits(max_outliers=n_esc - 1), "outliers")):
        assert token_frame.decode_token_frame(data, cfg, limits) is None
        with pytest.raises(FrameLimitError) as exc:
            decode_frame(data, limits, config=cfg)
        assert exc.value.field == field
    out = token_frame.decode_token_frame(data, cfg, FrameLimits(d=cfg.d, max_tokens=1, max_outliers=n_esc))
    assert out is not None


def test_truncations_and_bit_flips_are_declined(cfg):
    _, data = one_token(cfg, 4, torch.float16, "escapes")
    for bad in (*truncations(data), *bit_flips(data, 200, seed=0)):
        assert token_frame.decode_token_frame(bad, cfg) is None
        with pytest.raises(FrameError):
            decode_frame(bad, config=cfg)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_resealed_mutations_agree_with_the_reference(cfg, dtype):
    """Frames with a valid CRC but changed contents: the fast path decodes exactly those the
    reference decodes, to the same bits, and declines the rest (which raise FrameError)."""
    rng = np.random.default_rng(1)
    decoded = 0
    for trial in range(400):
        _, data = one_token(cfg, trial % 7, dtype, ("plain", "escapes", "raw")[trial % 3])
        bad = bytearray(data[:-4])
        kind = int(rng.integers(3))
        i = int(rng.integers(1, len(bad)))  # past the tag (its fields are tested above)
        if kind == 0:
            bad[i] = int(rng.integers(256))
        elif kind == 1:
            del bad[i]
        else:
            bad.insert(i, int(rng.integers(256)))
        frame = reseal(bytes(bad), cfg)
        out = token_frame.decode_token_frame(frame, cfg)
        try:
            ref = reference(frame, cfg)
        except FrameError:
            assert out is None
            with pytest.raises(FrameError):
                decode_frame(frame, config=cfg)
            continue
        assert out is not None and torch.equal(bits(out), bits(ref))
        decoded += 1
    assert decoded > 0  # some mutations (a changed escape value) stay valid frames


def test_forged_fields_are_declined(cfg):
    x, data = one_token(cfg, 6, torch.float16, "escapes")
    enc = read_frame_v2(data, cfg)
    n_esc = enc.escapes.numel()
    tag, rest = data[:1], data[2:-4]  # the tag; after the escape count (one byte here): escapes, stream
    nan = torch.tensor([float("nan")], dtype=torch.float16).view(torch.uint8).numpy().tobytes()
    forged = {
        "escape count not minimal": tag + bytes([0x80 | n_esc, 0]) + rest,
        "one escape too few": tag + _varint(n_esc - 1) + rest[2:],
        "escape not finite": tag + _varint(n_esc) + nan + rest[2:],
        "trailing stream byte": tag + _varint(n_esc) + rest + b"\0\0",
        "escapes beyond the symbols": tag + _varint(cfg.d + 1) + rest,
        "dtype code 3": bytes([tag[0] | 3]) + _varint(n_esc) + rest,
        "raw bit on a coded token": bytes([tag[0] | TOKEN_RAW]) + _varint(n_esc) + rest,
        "the other layout's marker": bytes([tag[0] ^ (TOKEN_TAG ^ FOUR_LANE_TOKEN_TAG)]) + _varint(n_esc) + rest,
    }
    _, raw = one_token(cfg, 6, torch.float16, "raw")
    raw_tag, raw_rest = raw[:1], raw[2:-4]
    assert raw_tag[0] & ~TOKEN_TAG_MASK == TOKEN_RAW | 1 and raw[1] == 0
    forged["raw token not finite"] = raw_tag + _varint(0) + nan + raw_rest[2:]
    forged["raw token with a stream"] = raw_tag + _varint(0) + raw_rest + b"\1\0\0\1"
    forged["raw token with an escape"] = raw_tag + _varint(1) + raw_rest[:2] + raw_rest
    forged["raw token, raw bit clear"] = bytes([raw_tag[0] & ~TOKEN_RAW]) + _varint(0) + raw_rest
    for what, body in forged.items():
        frame = reseal(body, cfg)
        assert token_frame.decode_token_frame(frame, cfg) is None, what
        with pytest.raises(FrameError):
            decode_frame(frame, config=cfg)


def test_scaled_frames_take_the_scaled_marker_of_their_layout(cfg):
    four = cfg.d >= FOUR_LANES_MIN_SYMBOLS
    for scale in (-2, 3):
        view = cfg.scaled(scale)
        x = hidden(1, 20 + scale, cfg.d).half()
        data = encode(x, view).to_bytes()
        assert data[0] & TOKEN_TAG_MASK == (SCALED_FOUR_LANE_TOKEN_TAG if four else SCALED_TOKEN_TAG)
        out = token_frame.decode_token_frame(data, cfg)
        assert out is not None and torch.equal(bits(out), bits(reference(data, cfg)))
        if token_frame.has_native_encoder():
            assert token_frame.encode_token_frame(x, view, 0) == data


def test_four_lane_markers_do_not_name_the_nibble_coder(cfg):
    x = hidden(1, 30, cfg.d).half()
    nibble = encode(x, cfg).to_bytes("nibble")
    assert nibble[0] & TOKEN_TAG_MASK == TOKEN_TAG  # whatever d: the nibble coder has no lanes
    forged = reseal(bytes([nibble[0] ^ (TOKEN_TAG ^ FOUR_LANE_TOKEN_TAG)]) + nibble[1:-4], cfg)
    assert token_frame.decode_token_frame(forged, cfg) is None
    with pytest.raises(FrameError, match="four-lane token tag cannot name the nibble coder"):
        decode_frame(forged, config=cfg)


# The encoder: one C++ call gives the bytes of the general path, or declines to it.

needs_encoder = pytest.mark.skipif(not token_frame.has_native_encoder(),
                                   reason="C++ extension not built (pip install . builds splitkernels._C)")


@needs_encoder
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["plain", "escapes"])
def test_encoder_writes_the_general_paths_bytes(cfg, dtype, kind):
    for seed in range(8):
        x, general = one_token(cfg, 100 + seed, dtype, kind)
        fast = token_frame.encode_token_frame(x, cfg, 7)
        assert fast == general, (seed, len(fast or b""), len(general))
        assert encode_frame(x, cfg, start=7) == general
        assert torch.equal(bits(decode_frame(fast, config=cfg)), bits(reference(general, cfg)))


@needs_encoder
def test_encoder_declines_raw_tokens_and_non_finite_values(cfg):
    x, general = one_token(cfg, 3, torch.float16, "raw")
    assert token_frame.encode_token_frame(x, cfg, 0) is None
    assert encode_frame(x, cfg) == general  # the general path writes the raw token
    for bad in (float("nan"), float("inf")):
        y = hidden(1, 4, cfg.d)
        y[0, 9] = bad
        assert token_frame.encode_token_frame(y, cfg, 0) is None
        with pytest.raises(ValueError, match="finite"):
            encode_frame(y, cfg)


def shifted_config(d: int = D, classes: int = 4):
    """A config whose positions 1-7 weigh 50x a late one: shifts on the first bands (docs/FORMATS.md §5.2)."""
    cfg = calibrate(hidden(64 * 12, 5, d), bits=4.0, classes=classes, sensitivity=torch.ones(d),
                    position_sensitivity=torch.tensor([50.0] * 8 + [1.0] * 56))
    assert cfg.shift_end > 1 and max(cfg.position_shift) > 0
    return cfg


@pytest.fixture(scope="module", params=[(D, 1), (D, 4), (17, 1)], ids=["one-table", "classes", "d17"])
def shifted(request):
    return shifted_config(*request.param)


@needs_encoder
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [0, 3, -2])
def test_shifted_tokens_both_ways_as_the_general_path(shifted, dtype, scale):
    """Tokens at early positions code fine codes and a residual section in the one C++ call each
    way: the general path's bytes, the reference's values; raw tokens stay with the general path."""
    config = shifted.scaled(scale) if scale else shifted
    n_shifted = 0
    for start in range(shifted.shift_end + 2):
        for seed, kind in enumerate(("plain", "escapes", "raw")):
            x = one_token(config, 10 * start + seed, dtype, kind)[0]
            general = encode(x, config, start=start).to_bytes()
            fast = token_frame.encode_token_frame(x, config, start)
            assert fast == (None if kind == "raw" else general), (start, kind)
            is_shifted = bool(general[0] & TOKEN_SHIFTED)
            assert is_shifted == (start < shifted.shift_end and shifted.row_shifts(start, 1)[0] > 0)
            n_shifted += is_shifted and kind != "raw"
            out = token_frame.decode_token_frame(general, shifted)
            ref = reference(general, shifted)
            if kind == "raw" and is_shifted:
                assert out is None  # the reference parser's case
            else:
                assert out is not None and torch.equal(bits(out), bits(ref)), (start, kind)
            assert torch.equal(bits(decode_frame(general, config=shifted)), bits(ref))
    assert n_shifted >= 2 * (shifted.shift_end - 1)


@needs_encoder
def test_golden_shifted_token_both_ways():
    from test_codec_v2_golden import SHIFT_CONFIG, SHIFT_TOKEN_FRAME, X
    assert token_frame.encode_token_frame(X[1:2], SHIFT_CONFIG, 1) == SHIFT_TOKEN_FRAME
    assert token_frame.decode_token_frame(SHIFT_TOKEN_FRAME, SHIFT_CONFIG).tolist() == [[-0.75, 0.0, 7.0, 96.0]]


@needs_encoder
def test_token_shifts_of_a_prediction_both_ways():
    """A sink-prone id's own shift (§5.2.2): the id read before the C++ call sets the decoder's shift."""
    from test_codec_v2_prediction import IDS, SHIFT_CONFIG, TABLE, X
    for start in (1, 5, 127, 128):
        general = encode(X[1:2], SHIFT_CONFIG, start=start, tokens=IDS[1:2], embedding=TABLE).to_bytes()
        fast = token_frame.encode_token_frame(X[1:2], SHIFT_CONFIG, start, IDS[1:2], TABLE)
        assert fast == general and bool(general[0] & TOKEN_SHIFTED) == (start < 128)
        out = token_frame.decode_token_frame(general, SHIFT_CONFIG, None, TABLE)
        ref = decode(from_bytes(general, SHIFT_CONFIG), embedding=TABLE)
        assert out is not None and torch.equal(out, ref)
        assert start == 128 or ref.tolist() == [[-0.75, 0.0, 7.0, 96.0]]  # the golden token's fine value


@needs_encoder
def test_shifted_frames_forged_or_broken_are_the_references_errors(shifted):
    """Truncations, bit flips and resealed changes of shifted frames: the fast path decodes exactly
    the frames the reference decodes, to the same bits; set padding bits, a residual at an escape
    and another start position included."""
    rng = np.random.default_rng(2)
    early = [p for p in range(shifted.shift_end) if shifted.row_shifts(p, 1)[0] > 0]
    decoded = 0
    for trial in range(300):
        start = early[trial % len(early)]
        x = one_token(shifted, trial % 5, torch.float16, ("plain", "escapes")[trial % 2])[0]
        data = encode(x, shifted, start=start).to_bytes()
        if trial < 4:
            for bad in (*truncations(data), *bit_flips(data, 50, seed=trial)):
                assert token_frame.decode_token_frame(bad, shifted) is None
                with pytest.raises(FrameError):
                    decode_frame(bad, config=shifted)
        body = bytearray(data[:-4])
        kind = int(rng.integers(4))
        i = int(rng.integers(1, len(body)))
        if kind == 0:
            body[i] = int(rng.integers(256))
        elif kind == 1:
            del body[i]
        elif kind == 2:
            body.insert(i, int(rng.integers(256)))
        else:  # another start position (one varint byte: every early position is below 128)
            body[1] = early[int(rng.integers(len(early)))]
        frame = reseal(bytes(body), shifted)
        out = token_frame.decode_token_frame(frame, shifted)
        try:
            ref = reference(frame, shifted)
        except FrameError:
            assert out is None, trial
            continue
        assert out is not None and torch.equal(bits(out), bits(ref)), trial
        decoded += 1
    assert decoded > 0


@needs_encoder
def test_shifted_residual_padding_and_escape_residuals_are_refused():
    cfg = shifted_config(17, 1)  # 17 channels of an odd shift: the section ends in padding bits
    start = next(p for p in range(cfg.shift_end) if cfg.row_shifts(p, 1)[0] % 2)
    s = int(cfg.row_shifts(start, 1)[0])
    x = hidden(1, 3, 17)
    x[0, 0] = 1e4  # an escape in channel 0: its residual field must be 2^(s-1)
    data = encode(x, cfg, start=start).to_bytes()
    enc = read_frame_v2(data, cfg)
    assert enc.escapes.numel() == 1 and enc.symbols[0, 0] == cfg.escape_symbol
    at = 1 + 1 + 1 + 4  # tag, start, escape count, the fp32 escape: the residual section
    size = (17 * s + 7) // 8
    assert token_frame.decode_token_frame(data, cfg) is not None
    padded = bytearray(data[:-4])
    padded[at + size - 1] |= 0x80  # a padding bit
    escaped = bytearray(data[:-4])
    escaped[at] ^= 1  # channel 0's field: a residual at the escape
    for body, match in ((padded, "padding bits"), (escaped, "escaped value is not 0")):
        frame = reseal(bytes(body), cfg)
        assert token_frame.decode_token_frame(frame, cfg) is None
        with pytest.raises(FrameError, match=match):
            decode_frame(frame, config=cfg)


@needs_encoder
def test_encoder_takes_odd_widths_and_strided_tokens():
    for d in (1, 3, 17, 130):
        g = torch.Generator().manual_seed(d)
        config = calibrate(torch.randn(400, d, generator=g) * 3, bits=3.0, classes=1)
        wide = torch.randn(2, 2 * d, generator=g)
        x = wide[:1, ::2]  # a strided view
        assert token_frame.encode_token_frame(x, config, 0) == encode(x, config).to_bytes()


def wire_values(d: int, seed: int) -> torch.Tensor:
    """fp32 values that stress a cast: fp16 subnormals and its smallest normals, halfway cases of
    fp16 and bf16 (ties to even), the largest fp16 values, signed zeros, and escapes (exact on the
    wire) whose fp16 (4003) and bf16 (-4024) roundings differ from truncation."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, d, generator=g) * 3
    special = torch.tensor([6e-8, -3e-8, 6.1e-5, -6.1035e-5, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8,
                            -(1 + 3 * 2.0 ** -8), 65504.0, 65519.0, -0.0, 0.0, 4003.0, -4024.0])
    x[0, : min(d, special.numel())] = special[: min(d, special.numel())]
    return x


@needs_encoder
@pytest.mark.parametrize("source", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wire", [torch.float16, torch.bfloat16, torch.float32])
def test_encoder_rounds_to_the_wire_dtype_as_torch_does(cfg, source, wire):
    """The C++ call's own cast gives the frame of ``to_wire(x, wire)`` byte for byte, and decodes
    to its dtype."""
    for seed in range(6):
        x = wire_values(cfg.d, seed)
        if source is torch.bfloat16:
            x[0, 8:10] = 60000.0  # 65504 and 65519 round to bf16's 65536, which no fp16 holds (the next test)
        x = x.to(source)
        fused = token_frame.encode_token_frame(x, cfg, 9, wire_dtype=wire)
        expected = encode(to_wire(x, wire), cfg, start=9).to_bytes()
        assert fused == expected, (seed, source, wire)
        assert encode_frame(x, cfg, start=9, wire_dtype=wire) == expected
        assert decode_frame(fused, config=cfg).dtype == wire


@needs_encoder
def test_a_wire_dtype_that_cannot_hold_the_token_is_the_casts_error(cfg):
    x = hidden(1, 11, cfg.d)
    x[0, 5] = 70000.0  # beyond fp16's range: the cast gives infinity
    assert token_frame.encode_token_frame(x, cfg, 9, wire_dtype=torch.float16) is None
    with pytest.raises(ValueError, match="wire_dtype float16 cannot hold"):
        encode_frame(x, cfg, start=9, wire_dtype=torch.float16)
    assert encode_frame(x, cfg, start=9, wire_dtype=torch.bfloat16) == encode(x.bfloat16(), cfg, start=9).to_bytes()
    x[0, 5] = float("nan")  # not finite before the cast: the codec's own error
    with pytest.raises(ValueError, match="finite"):
        encode_frame(x, cfg, start=9, wire_dtype=torch.float16)


@needs_encoder
def test_the_binding_refuses_bad_arguments_with_one_line(cfg):
    x = hidden(1, 12, cfg.d)
    args = token_frame._cached(token_frame._ENC_ARGS, cfg, token_frame._encoder_args)
    native = token_frame._C.v2_encode_token_frame
    head = (x.data_ptr(), *args[:9], 0, args[9])  # through raw_limit, then dtype fp32 and the lanes
    ok = native(*head, b"", 0, 5, 2)  # an fp32 token at position 5, shift 2
    assert isinstance(ok, bytes) and ok[0] & TOKEN_SHIFTED
    for bad, match in (({"shift": 7}, "shift or start"), ({"shift": -1}, "shift or start"),
                       ({"start": -1}, "shift or start"), ({"start": 2 ** 31}, "shift or start"),
                       ({"src_dtype": 3}, "src_dtype")):
        with pytest.raises(ValueError, match=match):
            native(*head, **{"ids": b"", "src_dtype": 0, "start": 5, "shift": 2, **bad})
