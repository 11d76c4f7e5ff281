"""Receiver limits on codec frames and the bounded-memory decoder (decode_frame): a forged header
is refused before anything sized by it is allocated, and decoding never builds ``T x d`` scratch."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

from splitkernels import codec
from splitkernels.codec import CodecConfig, FrameError, FrameLimitError, FrameLimits, decode_frame
from splitkernels.codec import encoded as encoded_module
from splitkernels.codec.frame import HEADER, MAGIC


def _frames():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 51, generator=g)
    x[:, 5] *= 30
    wide = x.clone()
    wide[7, :] *= 1e6  # a token that travels raw (its range does not fit fp16)
    return [
        codec.encode(wide, CodecConfig(capacity=4, eps=0.05)).to_bytes(),
        codec.encode(x.half(), CodecConfig(mode="budget", avg_bits=3.0, capacity=2)).to_bytes(),
        codec.encode(x[:1].bfloat16(), CodecConfig.passthrough()).to_bytes(),
        codec.encode(x[:5], CodecConfig(capacity=0, bit_choices=(1, 2, 7), eps=0.5)).to_bytes(),
    ]


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 64])
def test_decode_frame_equals_from_bytes_then_decode(monkeypatch, chunk_bytes):
    monkeypatch.setattr(encoded_module, "_CHUNK_BYTES", chunk_bytes)  # 64: one token per chunk
    for frame in _frames():
        want = codec.decode(codec.from_bytes(frame))
        got = decode_frame(frame)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_limits_name_the_field_and_come_before_the_crc():
    frame = _frames()[0]
    t, d = 37, 51
    broken_crc = frame[:-4] + bytes(4)
    cases = {
        "d": FrameLimits(d=52),
        "dtype": FrameLimits(dtypes=frozenset({torch.float16})),
        "tokens": FrameLimits(max_tokens=t - 1),
        "outliers": FrameLimits(max_outliers=0),
    }
    for field, limits in cases.items():
        for data in (frame, broken_crc):
            with pytest.raises(FrameLimitError) as e:
                decode_frame(data, limits)
            assert e.value.field == field
        with pytest.raises(FrameLimitError):
            codec.from_bytes(frame, limits=limits)
    ok = FrameLimits(d=d, dtypes=frozenset({torch.float32}), max_tokens=t, max_outliers=t * 4)
    assert torch.equal(decode_frame(frame, ok), codec.decode(codec.from_bytes(frame, limits=ok)))
    with pytest.raises(FrameError, match="CRC"):
        decode_frame(broken_crc, ok)


def test_length_must_fit_the_header_before_the_crc_is_computed():
    body = bytearray(HEADER.pack(MAGIC, 1, 0, 0, 0, 3, 8, 0)) + bytes(10)
    frame = bytes(body) + struct.pack("<I", zlib.crc32(body))
    with pytest.raises(FrameError, match="cannot hold T=3, d=8"):
        decode_frame(frame)


# Runs in a fresh interpreter: builds each forged frame (valid CRC) in place, decodes it once (the
# first decode of a shape faults in kernel code pages and creates thread arenas: once per process,
# not per frame), resets the peak RSS (/proc/self/clear_refs), decodes it again with the limits a
# server with d=576 and 2048 free positions applies, and prints the peak growth per frame.
MEMORY_PROBE = """
import json, resource, struct, sys, zlib
import torch
from splitkernels.codec import FrameError, FrameLimits, decode_frame
from splitkernels.codec.frame import HEADER, MAGIC

def forged(size, t, d, bits):
    buf = bytearray(size)
    HEADER.pack_into(buf, 0, MAGIC, 1, 0, 0, 0, t, d, 0)
    p = HEADER.size
    buf[p:p + t] = bytes([bits]) * t  # widths; step, lo, counts stay 0, the streams are zeros
    struct.pack_into("<I", buf, size - 4, zlib.crc32(memoryview(buf)[:size - 4]))
    return buf

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

limits = FrameLimits(d=576, max_tokens=2048)

def decode(frame):
    try:
        y = decode_frame(frame, limits)
        return f"decoded {tuple(y.shape)}"
    except FrameError as exc:
        return type(exc).__name__

out = []
for size, t, d, bits in json.loads(sys.argv[1]):
    frame = forged(size, t, d, bits)
    decode(frame)
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    outcome = decode(frame)
    out.append({"frame_bytes": size, "t": t, "d": d, "growth_bytes": status("VmHWM:") - before, "outcome": outcome})
print(json.dumps(out))
"""


def _token_bytes(d: int, bits: int) -> int:
    return 7 + (d * bits + 7) // 8  # bits u8, step/lo f16, count u16, stream


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset needs /proc/self/clear_refs")
def test_forged_frames_up_to_the_message_limit_stay_within_4x_their_size(tmp_path):
    fixed = HEADER.size + 4
    cases = [
        (62 << 20, 31, 1 << 24, 1),  # the reported attack: d = 2^24, 1-bit codes
        (60 << 20, (60 << 20) // _token_bytes(576, 1), 576, 1),  # ~800k tokens
        (1 << 20, (1 << 20) // _token_bytes(576, 1), 576, 1),
        # Within the limits: the largest frames a server with d=576 accepts decode normally.
        (fixed + 2048 * (7 + 576 * 4), 2048, 576, 32),  # raw fp32 tokens
        (fixed + 2048 * _token_bytes(576, 8), 2048, 576, 8),
        (fixed + 2048 * _token_bytes(576, 1), 2048, 576, 1),  # small frame, large output: fixed scratch only
    ]
    # cwd: from the repository root ``python -c`` would import the source tree, not the install.
    # A fixed mmap threshold: glibc otherwise raises it after the first large free, and memory a
    # later decode reuses from the heap would hide its scratch (or a previous case's would show).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    probe = subprocess.run([sys.executable, "-c", textwrap.dedent(MEMORY_PROBE), json.dumps(cases)],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert probe.returncode == 0, probe.stderr
    results = json.loads(probe.stdout)
    for r in results:
        output_bytes = r["t"] * r["d"] * 4 if r["outcome"].startswith("decoded") else 0
        # Scratch: at most 4x the frame; a decoded frame also owns its fp32 output.
        allowed = 4 * r["frame_bytes"] + output_bytes + (2 << 20)
        assert r["growth_bytes"] <= allowed, r
    assert [r["outcome"] for r in results[:3]] == ["FrameLimitError"] * 3
    assert all(r["outcome"].startswith("decoded (2048, 576)") for r in results[3:])
    # The refused attack frames cost (next to) nothing, whatever their size.
    assert all(r["growth_bytes"] < (2 << 20) for r in results[:3]), results
