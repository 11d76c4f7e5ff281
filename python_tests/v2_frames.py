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
