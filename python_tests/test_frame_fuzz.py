"""from_bytes on damaged frames: always FrameError, never another exception, never a hang."""
import random
import struct
import zlib

import pytest
import torch

from splitkernels import codec
from splitkernels.codec import CodecConfig, FrameError


def sample_frames():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g)
    x[:, 3] *= 20
    return [
        codec.encode(x, CodecConfig(capacity=4, eps=0.05)).to_bytes(),
        codec.encode(x.half(), CodecConfig(mode="budget", avg_bits=4.0)).to_bytes(),
        codec.encode(x[:1].bfloat16(), CodecConfig.passthrough()).to_bytes(),
    ]


FRAMES = sample_frames()


def reseal(body: bytes) -> bytes:
    """Recompute the CRC so the mutation reaches the structural checks behind it."""
    return body + struct.pack("<I", zlib.crc32(body))


def must_reject_or_decode(data: bytes) -> None:
    try:
        enc = codec.from_bytes(data)
    except FrameError:
        return
    out = codec.decode(enc)  # a forged but well-formed frame must decode to a finite tensor
    assert out.shape == enc.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("frame", FRAMES)
def test_every_truncation_and_extension_is_rejected(frame):
    for n in range(len(frame)):
        with pytest.raises(FrameError):
            codec.from_bytes(frame[:n])
    for extra in (b"\x00", b"\xff" * 7):
        with pytest.raises(FrameError):
            codec.from_bytes(frame + extra)


@pytest.mark.parametrize("frame", FRAMES)
def test_random_bit_flips_are_rejected(frame):
    rng = random.Random(1)
    for _ in range(1500):
        data = bytearray(frame)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(data) * 8)
            data[pos // 8] ^= 1 << (pos % 8)
        if bytes(data) != frame:
            with pytest.raises(FrameError):
                codec.from_bytes(bytes(data))


@pytest.mark.parametrize("frame", FRAMES)
def test_resealed_mutations_never_escape_as_other_errors(frame):
    rng = random.Random(2)
    body = frame[:-4]
    for _ in range(1500):
        data = bytearray(body)
        kind = rng.randrange(3)
        if kind == 0:
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:
            cut = rng.randrange(len(data))
            data = data[:cut] + data[cut + rng.randint(1, 8):]
        else:
            cut = rng.randrange(len(data))
            data = data[:cut] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))) + data[cut:]
        must_reject_or_decode(reseal(bytes(data)))


def test_forged_headers_are_rejected():
    body = bytearray(FRAMES[0][:-4])
    cases = {
        "magic": (0, b"XXXX"),
        "version": (4, b"\x02"),
        "dtype": (5, b"\x09"),
        "flags": (6, b"\x01"),
        "huge T": (8, struct.pack("<I", 0xFFFFFFFF)),
        "zero d": (12, struct.pack("<I", 0)),
        "huge outlier total": (16, struct.pack("<I", 0x7FFFFFFF)),
    }
    for name, (offset, patch) in cases.items():
        data = bytearray(body)
        data[offset : offset + len(patch)] = patch
        with pytest.raises(FrameError):
            codec.from_bytes(reseal(bytes(data)))


def test_bad_widths_indices_and_values_are_rejected():
    x = torch.tensor([[0.1, 9.0, 0.2, 0.3, -9.5, 0.4]])
    frame = codec.encode(x, CodecConfig(threshold="abs", tau=1.0, capacity=2, eps=0.5)).to_bytes()
    body = bytearray(frame[:-4])
    header = 20
    t = 1
    bits_at, counts_at = header, header + 5 * t
    idx_at = counts_at + 2 * t
    val_at = idx_at + 2 * 2

    def patched(offset, raw):
        data = bytearray(body)
        data[offset : offset + len(raw)] = raw
        return reseal(bytes(data))

    for width in (0, 9, 15, 16, 255):
        with pytest.raises(FrameError, match="bit width"):
            codec.from_bytes(patched(bits_at, bytes([width])))
    with pytest.raises(FrameError, match="out of range"):
        codec.from_bytes(patched(idx_at, struct.pack("<HH", 1, 6)))
    with pytest.raises(FrameError, match="increasing"):
        codec.from_bytes(patched(idx_at, struct.pack("<HH", 4, 1)))
    with pytest.raises(FrameError, match="increasing"):
        codec.from_bytes(patched(idx_at, struct.pack("<HH", 4, 4)))
    with pytest.raises(FrameError, match="not finite"):
        codec.from_bytes(patched(val_at, struct.pack("<f", float("nan"))))
    with pytest.raises(FrameError, match="step"):
        codec.from_bytes(patched(header + t, struct.pack("<e", float("inf"))))


def test_non_bytes_input_is_rejected():
    with pytest.raises(FrameError):
        codec.from_bytes("not bytes")
