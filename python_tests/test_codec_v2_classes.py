"""Codec v2 channel-class tables: rANS with one table per channel class (reference vs C++),
the version-3 config layout, calibration and frames (docs/FORMATS.md §5.1, §5.3)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from splitkernels.codec import CodecConfigV2, FrameError, calibrate, decode, encode, from_bytes, rans

HAS_CPP = rans.has_native()


def random_classes(rng: np.random.Generator, nsym: int, k: int, d: int) -> rans.ClassTables:
    tables = [rans.build_freqs(rng.dirichlet(np.full(nsym, 0.3)) * 1000) for _ in range(k)]
    return rans.ClassTables(tables, rng.integers(0, k, size=d))


def symbols_for(ct: rans.ClassTables, n: int, rng: np.random.Generator) -> np.ndarray:
    """Symbols drawn from each position's own table (the coder's intended use)."""
    d = len(ct.table_of)
    return np.array([rng.choice(ct.nsym, p=np.asarray(ct.tables[ct.table_of[i % d]]) / rans.M) for i in range(n)], dtype=np.uint8)


@pytest.mark.parametrize("n,d", [(1, 5), (7, 3), (640, 640), (1000, 37), (rans.LANES_MIN_SYMBOLS + 5, 33)])
def test_class_rans_reference_round_trip_and_native_bytes(n, d):
    rng = np.random.default_rng(n + d)
    ct = random_classes(rng, int(rng.integers(2, 40)), int(rng.integers(2, 9)), d)
    sym = symbols_for(ct, n, rng) if n < 5000 else rng.integers(0, ct.nsym, size=n).astype(np.uint8)
    data = rans.encode_reference(sym, ct)
    assert np.array_equal(rans.decode_reference(data, ct, n), sym)
    if HAS_CPP:
        assert rans.encode(sym, ct) == data
        assert np.array_equal(rans.decode(data, ct, n), sym)


def test_class_tables_code_each_channel_with_its_own_table():
    # Channel 0 takes symbols 0/1 and channel 1 symbols 2/3: one pooled table pays about two bits
    # per symbol, class tables about one (no symbol may have probability above 1/2).
    rng = np.random.default_rng(3)
    sym = np.stack([rng.integers(0, 2, 4000), rng.integers(2, 4, 4000)], 1).astype(np.uint8)
    pooled = rans.build_freqs(np.bincount(sym.ravel(), minlength=4))
    ct = rans.ClassTables((rans.build_freqs([1, 1, 0, 0]), rans.build_freqs([0, 0, 1, 1])), (0, 1))
    assert len(rans.encode(sym, ct)) * 1.8 < len(rans.encode(sym, pooled))
    assert np.array_equal(rans.decode(rans.encode(sym, ct), ct, sym.size), sym.ravel())


@pytest.mark.parametrize("decoder", ["reference", "default"])
def test_class_rans_wrong_tables_or_corruption_raise(decoder):
    rng = np.random.default_rng(11)
    ct = random_classes(rng, 12, 4, 20)
    sym = symbols_for(ct, 400, rng)
    data = rans.encode(sym, ct)
    dec = rans.decode_reference if decoder == "reference" else rans.decode
    other = rans.ClassTables(ct.tables, tuple((c + 1) % 4 for c in ct.table_of))
    with pytest.raises(rans.RansError):
        dec(data, other, 400)
    bad = bytearray(data)
    bad[5] ^= 0x10
    with pytest.raises(rans.RansError):
        dec(bytes(bad), ct, 400)


@pytest.mark.parametrize("tables,table_of,words", [
    ((), (0,), "1..64"), (((8192, 8192),) * 65, (0,), "1..64"), (((8192, 8192), (4096, 4096, 8192)), (0, 1), "entries"),
    (((8192, 8192),), (), "table index"), (((8192, 8192),), (1,), "table index"), (((8192, 8192),), (-1,), "table index"),
    (((8000, 8384),), (0,), "freqs"),
])
def test_class_tables_validation(tables, table_of, words):
    with pytest.raises(ValueError, match=words):
        rans.ClassTables(tables, table_of)


# ---------------------------------------------------------------- config


def class_config(d: int = 6, k: int = 2) -> CodecConfigV2:
    rng = np.random.default_rng(d)
    tables = tuple(rans.build_freqs(rng.random(8) + 0.1) for _ in range(k))
    return CodecConfigV2(center=tuple(rng.standard_normal(d).tolist()), step=tuple((rng.random(d) + 0.5).tolist()), kmax=3,
                         freqs=tables[0], raw_limit=d // 2, class_freqs=tables, channel_class=tuple(i % k for i in range(d)))


def test_class_config_round_trips_and_fingerprints_its_tables():
    cfg = class_config()
    raw = cfg.canonical_bytes()
    assert raw[0] == 3 and CodecConfigV2.from_canonical_bytes(raw) == cfg
    back = CodecConfigV2.from_json(cfg.to_json())
    assert back == cfg and back.fingerprint == cfg.fingerprint and back.version == 3
    plain = CodecConfigV2(center=cfg.center, step=cfg.step, kmax=3, freqs=cfg.freqs, raw_limit=cfg.raw_limit)
    assert plain.version == 2 and plain.fingerprint != cfg.fingerprint
    swapped = CodecConfigV2(center=cfg.center, step=cfg.step, kmax=3, freqs=cfg.freqs, raw_limit=cfg.raw_limit,
                            class_freqs=cfg.class_freqs, channel_class=tuple(1 - c for c in cfg.channel_class))
    assert swapped.fingerprint != cfg.fingerprint


def test_class_config_bytes_forged_or_truncated_raise():
    cfg = class_config(d=5, k=3)
    raw = cfg.canonical_bytes()
    at = 13 + 8 * 5 + 2 * 8  # head, centers, steps, pooled table: then the u32 class count
    for bad, words in ((raw[: at + 2], "truncated"), (raw[:-1], "must be"), (raw + b"\0", "must be"),
                       (raw[:at] + (0).to_bytes(4, "little") + raw[at + 4:], "classes"),
                       (raw[:at] + (65).to_bytes(4, "little") + raw[at + 4:], "classes"),
                       (raw[:at] + (2**31).to_bytes(4, "little") + raw[at + 4:], "classes"),
                       (raw[: at + 4] + b"\x07" + raw[at + 5:], "table index")):
        with pytest.raises(ValueError, match=words):
            CodecConfigV2.from_canonical_bytes(bad)


def test_class_config_fields_checked():
    cfg = class_config()
    kw = dict(center=cfg.center, step=cfg.step, kmax=3, freqs=cfg.freqs, raw_limit=cfg.raw_limit)
    with pytest.raises(ValueError, match="together"):
        CodecConfigV2(**kw, class_freqs=cfg.class_freqs)
    with pytest.raises(ValueError, match="d = 6"):
        CodecConfigV2(**kw, class_freqs=cfg.class_freqs, channel_class=(0, 1))
    with pytest.raises(ValueError, match="2 \\* kmax"):
        CodecConfigV2(**kw, class_freqs=((8192, 8192),), channel_class=(0,) * 6)
    d = cfg.to_dict()
    d.pop("class_freqs")
    with pytest.raises(ValueError, match="class_freqs"):
        CodecConfigV2.from_dict(d)


# ---------------------------------------------------------------- calibration and frames


def heteroscedastic(n: int, d: int, seed: int) -> torch.Tensor:
    """Channels with scales over three decades (the same channels for every seed), as a residual
    stream has."""
    scales = torch.logspace(-1.5, 1.5, d)[torch.randperm(d, generator=torch.Generator().manual_seed(d))]
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * scales


def test_calibrate_fits_class_tables_that_save_bits():
    h = heteroscedastic(512, 128, 0)
    one = calibrate(h, bits=4.0, classes=1)
    many = calibrate(h, bits=4.0)
    assert one.class_freqs == () and many.info["classes"] == 8  # 128 channels, 16 per class
    assert len(set(many.channel_class)) == 8
    x = heteroscedastic(256, 128, 1)
    # Same quantiser (step, center) with and without classes: fewer bytes with them.
    same = CodecConfigV2(center=many.center, step=many.step, kmax=many.kmax, freqs=many.freqs, raw_limit=many.raw_limit)
    assert encode(x, many).nbytes < 0.97 * encode(x, same).nbytes
    assert torch.equal(decode(encode(x, many)), decode(encode(x, same)))
    # At the same bit target, the classes buy a finer step.
    assert many.step_array()[0] < one.step_array()[0]
    with pytest.raises(ValueError, match="classes"):
        calibrate(h, classes=0)
    assert calibrate(torch.randn(64, 20)).class_freqs == ()  # 20 channels: too few for two classes


@pytest.mark.parametrize("t", [1, 3, 130])
def test_class_frames_round_trip_and_reject_mismatch(t):
    h = heteroscedastic(512, 64, 2)
    cfg = calibrate(h, bits=3.5)
    x = heteroscedastic(t, 64, 3).to(torch.float16)
    x[0, :40] = 3e4  # a raw token
    frame = encode(x, cfg).to_bytes()
    back = from_bytes(frame, config=cfg)
    assert torch.equal(decode(back), decode(encode(x, cfg)))
    other = calibrate(h, bits=3.5, classes=2)
    with pytest.raises(FrameError):
        from_bytes(frame, config=other)
    for cut in range(0, len(frame), max(1, len(frame) // 40)):
        with pytest.raises(FrameError):
            from_bytes(frame[:cut], config=cfg)
