"""Codec v2 token prediction (docs/FORMATS.md §5.2.1): config, frames, golden vectors, errors, calibration."""
from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
import torch

from splitkernels.codec import (CodecConfigV2, FrameError, FrameLimits, calibrate, decode, decode_frame, encode, encode_frame,
                                from_bytes, token_frame)
from splitkernels.codec.calibrate import CEILING, PREDICTION_MIN_SAVING, default_bits_ceiling, token_shifts
from splitkernels.codec.config_v2 import TOKEN_SHIFT_END
from splitkernels.codec.predict import EmbeddingPrediction, embedding_table, fit_gain, table_digest
from splitkernels.planner.costs import frame_bytes_v2
from v2_frames import bit_flips, reseal, truncations

# The golden config of test_codec_v2_golden with a prediction: vocab 5 (3-bit ids).
TABLE = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.5, -1.0, 4.0, 5.0],
                      [-1.0, 2.0, 0.25, -10.0]])
PRED = EmbeddingPrediction((0.5, 1.0, 0.0, 2.0), 5, table_digest(TABLE))
CONFIG = CodecConfigV2(center=(0.0, 1.0, -2.0, 100.0), step=(0.5, 0.25, 1.0, 2.0), kmax=2,
                       freqs=(1024, 3072, 8192, 3072, 1023, 1), raw_limit=2, prediction=PRED)
X = torch.tensor([[0.3, 0.2, -5.5, 111.0], [-0.75, 0.0, 7.0, 96.0], [9.0, -9.0, 9.0, 90.0]], dtype=torch.float16)
IDS = torch.tensor([3, 0, 4])
# Token 0 (id 3, prediction (0.25, -1, 0, 10)) codes residual (0.05, 1.2, -5.5, 101): symbols 2, 3, escape, 2;
# token 1 (id 0, prediction 0) is the plain golden token 1; token 2 (id 4) escapes four times: raw, in fp32.
FRAME = bytes.fromhex("534b5451020003030301040000b0c0000000000000e04000001841000030c1000010410000dc42"
                      "ffe36a00ff93ff3f000099d0821b")
TOKEN_FRAME = bytes.fromhex("a00200000000000000e040ffc31300ff3f00009685bf0a")  # token 1: tag (fp32), 2 escapes, id 0, ...


def reference(x: torch.Tensor, ids: torch.Tensor, config: CodecConfigV2, table: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch decode of what the codec sends (no raw tokens, no escapes in the rows given)."""
    p = table[ids].float() * torch.tensor(config.prediction.gain)
    u = x.float() - p
    step, center = torch.tensor(config.step), torch.tensor(config.center)
    q = torch.round((u - center) * (1 / step)).clamp(-config.kmax, config.kmax)
    return (q * step + center) + p


def test_golden_prediction_config():
    assert CONFIG.version == 5 and CONFIG.canonical_bytes()[0] == 5
    assert CONFIG.canonical_bytes()[-(36 + 16 + 1):-(16 + 1)] == struct.pack("<I", 5) + bytes.fromhex(PRED.table)
    assert CONFIG.canonical_bytes()[-1] == 0  # no token shifts
    assert PRED.table == table_digest(TABLE) and PRED.id_bits == 3
    assert CodecConfigV2.from_canonical_bytes(CONFIG.canonical_bytes()) == CONFIG
    assert CodecConfigV2.from_json(CONFIG.to_json()) == CONFIG
    plain = dataclasses.replace(CONFIG, prediction=None)
    assert plain.version == 2 and plain.fingerprint != CONFIG.fingerprint
    other = dataclasses.replace(CONFIG, prediction=EmbeddingPrediction((0.5, 1.0, 0.0, 2.5), 5, PRED.table))
    assert other.fingerprint != CONFIG.fingerprint


def test_golden_prediction_frames():
    enc = encode(X, CONFIG, tokens=IDS, embedding=TABLE)
    assert enc.tokens.tolist() == [3, 0, 4] and enc.dtype == torch.float32  # residual escapes travel in fp32
    assert enc.to_bytes() == FRAME
    assert enc.symbols.tolist() == [[2, 3, 5, 2], [0, 5, 5, 0], [0, 0, 0, 0]] and enc.raw.tolist() == [False, False, True]
    assert enc.escapes.tolist() == [-5.5, 0.0, 7.0] and enc.raw_values.tolist() == [[9.5, -11.0, 9.0, 110.0]]
    assert FRAME[8:10] == bytes([0b00000011, 0b00000001])  # after the escape count: ids 3, 0, 4 in 3 bits each, LSB first
    y = decode(from_bytes(FRAME, config=CONFIG), embedding=TABLE)
    assert y.dtype == torch.float32
    assert y.tolist() == [[0.25, 0.25, -5.5, 110.0], [-1.0, 0.0, 7.0, 96.0], [9.0, -9.0, 9.0, 90.0]]
    coded = ([0, 0, 0, 1, 1], [0, 1, 3, 0, 3])  # (row, channel) of the coded values: as the plain reference
    assert torch.equal(y[coded], reference(X, IDS, CONFIG, TABLE)[coded])
    assert y[2].tolist() == X[2].float().tolist()  # a raw row: the residual exact, plus the prediction back
    assert encode(X[1:2], CONFIG, tokens=IDS[1:2], embedding=TABLE).to_bytes() == TOKEN_FRAME
    assert TOKEN_FRAME[:3] == bytes([0xA0, 2, 0])  # tag (fp32, rANS), escape count, the id 0 in one byte
    assert torch.equal(decode_frame(TOKEN_FRAME, config=CONFIG, embedding=TABLE), y[1:2])


# Token shifts (docs/FORMATS.md §5.2.2): id 0 codes with step / 4 below position 128. Token 1 of the
# golden input has id 0 (prediction 0), so at position 1 it codes as the position-shift golden vector's
# token 1 (test_codec_v2_golden: symbol 1 and residual -2 in channel 0).
SHIFT_CONFIG = dataclasses.replace(CONFIG, token_shift=((0, 2),))
SHIFT_FRAME = bytes.fromhex("534b545102800300030301040000b0c0000000000000e04000001841000030c1000010410000dc42a8ff672500ff1bff3f0000334206aa")


def test_golden_token_shift_frame():
    enc = encode(X, SHIFT_CONFIG, start=0, tokens=IDS, embedding=TABLE)
    assert enc.symbols.tolist() == [[2, 3, 5, 2], [1, 5, 5, 0], [0, 0, 0, 0]]
    assert enc.residuals.tolist() == [[0, 0, 0, 0], [-2, 0, 0, 0], [0, 0, 0, 0]] and enc.start == 0
    assert enc.to_bytes() == SHIFT_FRAME and SHIFT_FRAME[5] == 0x80  # fp32, rANS, shifted rows
    y = decode(from_bytes(SHIFT_FRAME, config=SHIFT_CONFIG), embedding=TABLE)
    assert y[1].tolist() == [-0.75, 0.0, 7.0, 96.0]
    assert SHIFT_CONFIG.canonical_bytes()[-6:] == bytes([1]) + struct.pack("<IB", 0, 2)
    assert CodecConfigV2.from_canonical_bytes(SHIFT_CONFIG.canonical_bytes()) == SHIFT_CONFIG
    assert CodecConfigV2.from_json(SHIFT_CONFIG.to_json()) == SHIFT_CONFIG
    # Past position 127 the token codes with the plain step; ids without a shift never change.
    assert encode(X[1:2], SHIFT_CONFIG, start=128, tokens=IDS[1:2], embedding=TABLE).residuals is None
    assert encode(X[:1], SHIFT_CONFIG, start=1, tokens=IDS[:1], embedding=TABLE).residuals is None
    one = encode_frame(X[1:2], SHIFT_CONFIG, start=5, tokens=IDS[1:2], embedding=TABLE)  # the one-token path
    assert one == encode(X[1:2], SHIFT_CONFIG, start=5, tokens=IDS[1:2], embedding=TABLE).to_bytes()
    assert decode_frame(one, config=SHIFT_CONFIG, embedding=TABLE).tolist() == [[-0.75, 0.0, 7.0, 96.0]]
    with pytest.raises(ValueError, match="token_shift needs a prediction"):
        dataclasses.replace(SHIFT_CONFIG, prediction=None)
    with pytest.raises(ValueError, match="ids increasing"):
        dataclasses.replace(CONFIG, token_shift=((3, 2), (1, 2)))


def test_frames_round_trip_through_every_entry_point():
    torch.manual_seed(0)
    table = torch.randn(300, 48)
    ids = torch.randint(0, 300, (37,))
    x = (4.0 * table[ids] + 0.05 * torch.randn(37, 48)).to(torch.bfloat16)
    cfg = calibrate(x.float(), bits=4.0, tokens=ids, embedding=table)
    assert cfg.prediction is not None and cfg.info["prediction_saving"] > 1.0
    enc = encode(x, cfg, start=0, tokens=ids, embedding=table)
    frame = enc.to_bytes()
    assert encode_frame(x, cfg, tokens=ids, embedding=table) == frame
    y = decode_frame(frame, config=cfg, embedding=table)
    assert torch.equal(y, decode(from_bytes(frame, cfg), embedding=table))
    err = float((y - x.float()).norm() / x.float().norm())
    assert err < 0.02
    for t in (0, 5, 36):  # one-token frames take the general path (the C++ one declines), same bytes
        one = encode_frame(x[t : t + 1], cfg, start=t, tokens=ids[t : t + 1], embedding=table)
        assert one == encode(x[t : t + 1], cfg, start=t, tokens=ids[t : t + 1], embedding=table).to_bytes()
        assert torch.equal(decode_frame(one, config=cfg, embedding=table), y[t : t + 1])
    # The planner's frame model counts the ids.
    n_esc = int(enc.escapes.numel())
    from splitkernels.planner.quality import v2_code_bits
    code_bits = v2_code_bits(enc, len(frame)) / 37
    assert frame_bytes_v2(37, 48, code_bits, n_esc / 37, torch.bfloat16,
                          id_bits=cfg.prediction.id_bits) == pytest.approx(len(frame), abs=2)


def test_calibrate_keeps_a_prediction_only_where_it_pays():
    torch.manual_seed(1)
    table = torch.randn(200, 32)
    ids = torch.randint(0, 200, (512,))
    unrelated = torch.randn(512, 32)
    cfg = calibrate(unrelated, bits=4.0, tokens=ids, embedding=table)
    assert cfg.prediction is None and cfg.info["prediction_saving"] < PREDICTION_MIN_SAVING  # the ids cost more than it saves
    assert cfg == calibrate(unrelated, bits=4.0)
    gain = fit_gain(3.0 * table[ids] + 1.0, table[ids])
    assert gain.tolist() == pytest.approx([3.0] * 32, rel=1e-4)
    predicted = calibrate(3.0 * table[ids] + 0.1 * unrelated, bits=CEILING, tokens=ids, embedding=table)
    assert predicted.prediction is not None
    assert predicted.info["target_bits"] == default_bits_ceiling(32, predicted.prediction.id_bits)


def test_embedding_table_predicts_only_at_the_split_width():
    model = torch.nn.Module()
    model.emb = torch.nn.Embedding(10, 16)
    model.get_input_embeddings = lambda: model.emb
    assert embedding_table(model) is model.emb.weight and embedding_table(model, 16) is model.emb.weight
    assert embedding_table(model, 32) is None  # a factorised embedding (projected up to 32 after it) cannot predict
    model.emb = torch.nn.Linear(4, 4)  # no [V, d] table
    model.emb.weight = torch.nn.Parameter(torch.zeros(4, 4, 2))
    assert embedding_table(model) is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(tokens=None, embedding=TABLE), "tokens="),
    (dict(tokens=IDS, embedding=None), "embedding="),
    (dict(tokens=IDS[:2], embedding=TABLE), "one id per token"),
    (dict(tokens=torch.tensor([0, 1, 5]), embedding=TABLE), r"in \[0, 5\)"),
    (dict(tokens=torch.tensor([0.0, 1.0, 2.0]), embedding=TABLE), "integer ids"),
    (dict(tokens=IDS, embedding=TABLE[:4]), r"\[5, 4\] table"),
    (dict(tokens=IDS, embedding=TABLE + 1), "does not match"),
])
def test_bad_tokens_or_table_get_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        encode(X, CONFIG, **kwargs)


def test_decode_needs_the_same_table():
    enc = from_bytes(FRAME, config=CONFIG)
    with pytest.raises(ValueError, match="embedding="):
        decode(enc)
    with pytest.raises(ValueError, match="does not match"):
        decode_frame(FRAME, config=CONFIG, embedding=TABLE * 2)
    changed = TABLE.clone()
    assert table_digest(changed) == PRED.table
    changed[0, 0] = 1.0  # an in-place change is seen (the digest cache follows the version counter)
    with pytest.raises(ValueError, match="does not match"):
        decode(enc, embedding=changed)


def test_forged_ids_raise_frame_error():
    body = bytearray(TOKEN_FRAME[:-4])
    body[2] = 5  # id 5 of a 5-id vocabulary
    with pytest.raises(FrameError, match="not below the vocabulary"):
        from_bytes(reseal(bytes(body), CONFIG), config=CONFIG)
    body[2] = 0x08  # a padding bit above the 3-bit id
    with pytest.raises(FrameError, match="padding"):
        from_bytes(reseal(bytes(body), CONFIG), config=CONFIG)
    # A frame of the plain config does not decode under the predicting one, nor the other way round.
    plain = dataclasses.replace(CONFIG, prediction=None)
    with pytest.raises(FrameError, match="CRC"):
        from_bytes(encode(X, plain).to_bytes(), config=CONFIG)
    with pytest.raises(FrameError, match="CRC"):
        from_bytes(FRAME, config=plain)
    for cut in range(len(FRAME)):
        with pytest.raises(FrameError):
            from_bytes(FRAME[:cut], config=CONFIG)


def test_prediction_config_validation():
    with pytest.raises(ValueError, match="d = 4"):
        dataclasses.replace(CONFIG, prediction=EmbeddingPrediction((1.0,) * 3, 5, PRED.table))
    with pytest.raises(ValueError, match="vocab"):
        EmbeddingPrediction((1.0,) * 4, 0, PRED.table)
    with pytest.raises(ValueError, match="finite"):
        EmbeddingPrediction((1.0, float("nan"), 0.0, 0.0), 5, PRED.table)
    with pytest.raises(ValueError, match="hex"):
        EmbeddingPrediction((1.0,) * 4, 5, "xyz")
    data = CONFIG.canonical_bytes()
    with pytest.raises(ValueError, match="truncated"):
        CodecConfigV2.from_canonical_bytes(data[:-1])
    for cut in range(1, 6):  # inside the token shift list
        with pytest.raises(ValueError, match="must be"):
            CodecConfigV2.from_canonical_bytes(SHIFT_CONFIG.canonical_bytes()[:-cut])
    with pytest.raises(ValueError, match="must be"):
        CodecConfigV2.from_canonical_bytes(data + b"\0")
    d = CONFIG.to_dict()
    del d["prediction"]
    with pytest.raises(ValueError, match="prediction"):
        CodecConfigV2.from_dict(d)


@pytest.mark.skipif(not token_frame.has_native(), reason="C++ extension not built (pip install . builds splitkernels._C)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_one_token_fast_path_writes_and_reads_the_general_paths_bytes(dtype):
    torch.manual_seed(2)
    table = torch.randn(70000, 40)  # 17-bit ids: three id bytes
    ids = torch.randint(0, 70000, (24,))
    x = 3.0 * table[ids] + 0.1 * torch.randn(24, 40)
    x[5, :3] *= 300.0  # escapes
    x[9] *= 500.0  # raw: the fast encoder declines, the general path writes it
    cfg = calibrate(x, bits=4.0, tokens=ids, embedding=table)
    assert cfg.prediction is not None and cfg.prediction.id_bytes(1) == 3
    x = x.to(dtype)
    for t in range(24):
        general = encode(x[t : t + 1], cfg, start=t, tokens=ids[t : t + 1], embedding=table).to_bytes()
        fast = token_frame.encode_token_frame(x[t : t + 1], cfg, t, ids[t : t + 1], table)
        assert fast == (None if t == 9 else general)
        out = token_frame.decode_token_frame(general, cfg, FrameLimits(d=40), table)
        ref = decode(from_bytes(general, cfg), embedding=table)
        assert out is not None and out.dtype == torch.float32 and torch.equal(out, ref)
        assert torch.equal(decode_frame(general, config=cfg, embedding=table), ref)
    frame = encode_frame(x[:1], cfg, tokens=ids[:1], embedding=table)
    assert token_frame.decode_token_frame(frame, cfg, None, None) is None  # no table: the general path raises
    with pytest.raises(ValueError, match="embedding="):
        decode_frame(frame, config=cfg)
    with pytest.raises(ValueError, match="tokens="):
        token_frame.encode_token_frame(x[:1], cfg, 0, None, table)
    # A forged id (resealed): the fast path declines, the general one names it.
    body = bytearray(frame[:-4])
    body[2:5] = (70000).to_bytes(3, "little")
    forged = reseal(bytes(body), cfg)
    assert token_frame.decode_token_frame(forged, cfg, None, table) is None
    with pytest.raises(FrameError, match="not below the vocabulary"):
        decode_frame(forged, config=cfg, embedding=table)
    for cut in range(len(frame)):
        assert token_frame.decode_token_frame(frame[:cut], cfg, None, table) is None


def test_token_shifts_follow_the_per_token_fisher():
    g = torch.Generator().manual_seed(3)
    p, windows = 160, 3
    ids = torch.randint(12, 50, (windows * p,), generator=g)
    pos = torch.arange(windows * p) % p
    ids[(pos % 10 == 0) & (pos >= 1)] = 7  # heavy everywhere it occurs
    ids[(pos % 10 == 5)] = 9  # a little heavier than a late token
    ids[[40, 200]] = 11  # heavy, but seen twice only
    trace = torch.ones(windows * p)
    trace[ids == 7] = 64.0  # 64 late tokens: rint(0.5 * log2 64) = 3, and one finer
    trace[ids == 9] = 4.0  # 1: below TOKEN_SHIFT_MIN
    trace[ids == 11] = 1000.0
    pairs, extra = token_shifts(ids, trace, torch.ones(p), ())
    assert pairs == ((7, 4),)
    n7 = int(((ids == 7) & (pos < TOKEN_SHIFT_END)).sum())
    assert extra == pytest.approx(4 * n7 / ids.shape[0])
    # Where the position shifts already give as much, the token shift costs nothing there.
    assert token_shifts(ids, trace, torch.ones(p), (4,) * 8)[1] == 0.0
    assert token_shifts(ids, torch.ones(windows * p), torch.ones(p), ()) == ((), 0.0)


def test_calibrate_sets_token_shifts_with_a_prediction_only():
    g = torch.Generator().manual_seed(4)
    p, windows = 160, 3
    table = torch.randn(50, 32, generator=g)
    ids = torch.randint(12, 50, (windows * p,), generator=g)
    ids[torch.arange(windows * p) % 10 == 3] = 7
    hidden = 3.0 * table[ids] + 0.1 * torch.randn(windows * p, 32, generator=g)
    trace = torch.ones(windows * p)
    trace[ids == 7] = 64.0
    kwargs = dict(bits=4.0, sensitivity=torch.ones(32), position_sensitivity=torch.ones(p), token_sensitivity=trace)
    cfg = calibrate(hidden, tokens=ids, embedding=table, **kwargs)
    assert cfg.prediction is not None and cfg.token_shift == ((7, 4),) and cfg.info["token_shift"] == [[7, 4]]
    enc = encode(hidden[:p], cfg, start=0, tokens=ids[:p], embedding=table)
    assert enc.residuals is not None and enc.residuals.shape[0] == TOKEN_SHIFT_END  # the shifted rows' low bits
    y = decode(from_bytes(enc.to_bytes(), cfg), embedding=table)
    err = (y - hidden[:p]).abs()
    heavy = (ids[:p] == 7) & (torch.arange(p) < TOKEN_SHIFT_END)
    assert float(err[heavy].max()) < float(err[~heavy].max()) / 4  # step / 16 against step
    assert calibrate(hidden, **kwargs).token_shift == ()  # no ids in the frames: no token shifts


@pytest.mark.parametrize("t", [1, 9])
def test_fuzz_predicted_frames(t):
    """Truncations and bit flips raise FrameError; resealed mutations (ids, shifted rows, sections)
    decode to something bounded by the frame's size or raise FrameError, nothing else."""
    torch.manual_seed(6)
    table = torch.randn(300, 24)
    ids = torch.randint(0, 300, (t,))
    ids[0] = 7
    hidden = 3.0 * table[torch.randint(0, 300, (400,))] + 0.1 * torch.randn(400, 24)
    base = calibrate(hidden, bits=4.0, tokens=torch.randint(0, 300, (400,)), embedding=table)
    cfg = dataclasses.replace(base, prediction=EmbeddingPrediction([3.0] * 24, 300, table_digest(table)),
                              token_shift=((7, 3),))
    x = (3.0 * table[ids] + 0.1 * torch.randn(t, 24)).half()
    x[-1, 0] = 900.0  # an escape
    data = encode(x, cfg, start=2, tokens=ids, embedding=table).to_bytes()
    assert from_bytes(data, config=cfg).residuals is not None  # id 7 below position 128: shifted rows
    for bad in (*truncations(data), *bit_flips(data, 200, seed=5)):
        with pytest.raises(FrameError):
            from_bytes(bad, config=cfg)
    rng = np.random.default_rng(7)
    body = data[:-4]
    for _ in range(300):
        bad = bytearray(body)
        bad[int(rng.integers(len(bad)))] = int(rng.integers(256))
        try:
            y = decode(from_bytes(reseal(bytes(bad), cfg), config=cfg), embedding=table)
        except FrameError:
            continue
        assert y.numel() * y.element_size() <= 64 * len(data) + 1024
