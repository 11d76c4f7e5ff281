"""Corrupted codec v2 frames for the fuzz tests: every truncation, random bit flips, and a body
resealed with a valid CRC (a v2 frame's CRC continues from its config's digest)."""
from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np


def reseal(body: bytes, config) -> bytes:
    """``body`` with a valid CRC for frames of ``config``."""
    return body + zlib.crc32(body, config.crc_seed).to_bytes(4, "little")


def truncations(data: bytes) -> Iterator[bytes]:
    """Every proper prefix of ``data``, the empty one first."""
    for n in range(len(data)):
        yield data[:n]


def bit_flips(data: bytes, count: int, seed: int) -> Iterator[bytes]:
    """``count`` copies of ``data`` with one random bit flipped each (CRC not updated)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        bad = bytearray(data)
        i = int(rng.integers(len(bad)))
        bad[i] ^= 1 << int(rng.integers(8))
        yield bytes(bad)


def byte_mutations(body: bytes, count: int, seed: int) -> Iterator[bytes]:
    """``count`` copies of ``body`` with one random byte replaced or deleted each (to reseal)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        bad = bytearray(body)
        i = int(rng.integers(len(bad)))
        if rng.integers(2):
            bad[i] = int(rng.integers(256))
        else:
            del bad[i]
        yield bytes(bad)


def fuzz_long_frame(data: bytes, config, decode_bytes, shape) -> None:
    """A long frame's truncations (the head and the last 300 bytes), 150 bit flips and 150 resealed
    flips in its last 2000 body bytes: ``decode_bytes`` raises only FrameError, and what decodes
    anyway has ``shape``."""
    from splitkernels.codec import FrameError

    cuts = [*range(0, 64), *range(len(data) - 300, len(data))]
    for bad in (*(data[:n] for n in cuts), *bit_flips(data, 150, seed=0)):
        try:
            decode_bytes(bad)
        except FrameError:
            continue
        raise AssertionError("a truncated or flipped frame decoded")
    body = data[:-4]
    rng = np.random.default_rng(1)
    for _ in range(150):  # resealed: the CRC passes, the stream must not
        bad = bytearray(body)
        at = int(rng.integers(len(bad) - 2000, len(bad)))
        bad[at] ^= 1 << int(rng.integers(8))
        try:
            out = decode_bytes(reseal(bytes(bad), config))
        except FrameError:
            continue
        assert out.shape == shape


def forged_long_header(coder: int, config) -> bytes:
    """A frame of coder ``coder`` claiming T = 2^24 tokens (no escapes, the raw bitmap) over a
    200-byte stream: the parser must refuse it before allocating anything T * d-sized."""
    from splitkernels.codec.frame_v2 import HEAD

    head = HEAD.pack(b"SKTQ", 2, 1 | coder << 4)
    return reseal(head + bytes([0x80, 0x80, 0x80, 0x08]) + b"\0" + bytes(1 << 21) + b"\1" * 200, config)


def long_frame_config():
    """A 64-channel config with four channel classes, calibrated at 4 bits on Gaussian channels of
    rising scale."""
    import torch

    from splitkernels.codec import calibrate

    torch.manual_seed(0)
    return calibrate(torch.randn(800, 64) * torch.linspace(0.2, 3.0, 64), bits=4.0, classes=4)


def long_input(t: int = 1024, seed: int = 1):
    """``[t, 64]`` fp16 activations for ``long_frame_config`` (1024 tokens: 2^16 values, a long
    frame), token 3 raw and one escape at token 5."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, 64, generator=g) * torch.linspace(0.2, 3.0, 64)
    x[3] *= 60.0  # a raw token
    x[5, 7] = 5e3  # an escape
    return x.half()


def frame_coder(data: bytes) -> int:
    """The coder field of a long frame's dtype byte."""
    return (data[5] & 0x7F) >> 4
