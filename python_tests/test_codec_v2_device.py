"""The codec v2 device pass (docs/FORMATS.md §5.5) against the reference and the C++ pass, bit for bit.

Each test runs once per device runner:

* ``cuda-emulation``: the CUDA kernels (csrc/cuda/codec_v2.cuh) under the host-side emulation
  (csrc/cuda/emulation), called through the cuda backend's glue with the extension replaced, on
  CPU tensors; needs g++ and the CUDA headers (skipped with the reason otherwise).
* ``triton``: the Triton kernels (splitkernels/triton/codec_v2_*.py) in the interpreter
  (TRITON_INTERPRET=1, set by conftest.py), or compiled on a GPU when TRITON_INTERPRET=0.
* ``cuda``: the compiled CUDA kernels on a GPU (skipped without one).

Integers (symbols, raw flags, escape values and their order, counts) and decoded values must
equal the PyTorch reference (``fused=False``) and, when built, the fused C++ pass. Every buffer
the device pass allocates starts poisoned.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import splitkernels
from splitkernels.codec import CodecConfigV2, calibrate, decode_frame, encode_frame, rans
from splitkernels.codec import v2 as v2mod
from splitkernels.codec import frame_center, v2_device
from splitkernels.codec.frame_v2 import EncodedV2
from splitkernels.codec.v2 import decode_v2, encode_v2

from test_cuda_backend import EmulatedModule, _build_emulation  # noqa: E402  (the emulation build and its ctypes shim)

ROOT_CSRC = Path(__file__).resolve().parents[1] / "csrc"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_GPU = torch.cuda.is_available()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The GPU-capable runners carry the gpu mark, so bench/gpu_check.sh's `pytest -m gpu` runs them.
RUNNERS = ("cuda-emulation", pytest.param("triton", marks=pytest.mark.gpu), pytest.param("cuda", marks=pytest.mark.gpu))


pytestmark = pytest.mark.usefixtures("poisoned_empty")  # conftest: torch.empty hands out 0xA5 bytes


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    return _build_emulation(ROOT_CSRC, tmp_path_factory.mktemp("cuda_emulation_v2") / "sk_cuda_emulation.so")


class Runner:
    """The device kernels of one backend and the device they run on."""

    def __init__(self, name: str, encode, decode, device: torch.device) -> None:
        self.name, self.encode_kernel, self.decode_kernel, self.device = name, encode, decode, device

    def encode(self, x: torch.Tensor, cfg: CodecConfigV2):
        return v2_device.encode(x.to(self.device), cfg, self.encode_kernel)

    def decode(self, enc: EncodedV2) -> torch.Tensor:
        y = v2_device.decode(enc.symbols, enc.raw, enc.escapes, enc.raw_values, enc.config, self.device,
                             self.decode_kernel)
        return y.cpu()


@pytest.fixture(params=RUNNERS)
def runner(request, monkeypatch):
    name = request.param
    if name == "cuda-emulation":
        from splitkernels._backends import cuda as glue

        monkeypatch.setattr(glue, "_C", EmulatedModule(request.getfixturevalue("emu_lib")))
        monkeypatch.setattr(glue, "_require_cuda", lambda name, t: None)
        monkeypatch.setattr(glue, "_stream", lambda device: 0)
        monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
        return Runner(name, glue.codec_v2_encode, glue.codec_v2_decode, torch.device("cpu"))
    if name == "triton":
        if not INTERPRET and not HAS_GPU:
            pytest.skip("TRITON_INTERPRET=0 and no CUDA device: the Triton kernels have nowhere to run")
        try:
            from splitkernels.triton import codec_v2_dequantise, codec_v2_quantise
        except ImportError as exc:
            pytest.skip(f"triton does not import ({exc})")
        device = torch.device("cpu" if INTERPRET else "cuda")
        return Runner(name, codec_v2_quantise.codec_v2_encode, codec_v2_dequantise.codec_v2_decode, device)
    if not HAS_GPU:
        pytest.skip("needs a CUDA device (the cuda-emulation runner covers the same kernels on CPU)")
    info = splitkernels.backends()["cuda"]
    if not info["available"]:
        pytest.fail(f"a CUDA device is present but the cuda backend is unavailable: {info['reason']}")
    from splitkernels._backends import cuda as glue

    return Runner(name, glue.codec_v2_encode, glue.codec_v2_decode, torch.device("cuda"))


# ---------------------------------------------------------------- data


def make_config(d: int, seed: int, kmax: int = 7, raw_limit: int | None = None) -> CodecConfigV2:
    """Random centers and steps, with every third channel at center 0 and a power-of-two step, so
    that exact thresholds (|v| == kmax) and exact ties (v = n + 0.5) can be written down."""
    g = torch.Generator().manual_seed(seed)
    center = torch.randn(d, generator=g) * 0.05
    step = torch.rand(d, generator=g) * 0.1 + 1e-3
    exact = torch.arange(d) % 3 == 0
    center[exact] = 0.0
    step[exact] = 2.0 ** -torch.randint(2, 6, (int(exact.sum()),), generator=g).float()
    if d > 1:
        center[1], step[1] = 0.0, 3e-7  # codes land on fp16 subnormals when decoded
    freqs = rans.build_freqs(np.ones(2 * kmax + 2))
    return CodecConfigV2(center=tuple(center.tolist()), step=tuple(step.tolist()), kmax=kmax, freqs=freqs,
                         raw_limit=max(1, d // 3) if raw_limit is None else raw_limit)


def make_input(t: int, cfg: CodecConfigV2, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Ties, values exactly at and just past the threshold, tiny values, a token with no escape,
    one with exactly raw_limit escapes (coded), one with raw_limit + 1 (raw), one all-escape (raw)."""
    g = torch.Generator().manual_seed(seed)
    d, k = cfg.d, cfg.kmax
    step, center = torch.tensor(cfg.step_array()), torch.tensor(cfg.center_array())
    halves = torch.randint(-2 * k - 4, 2 * k + 5, (t, d), generator=g).float() / 2  # ties and escapes
    x = center + halves * step
    x = torch.where(torch.rand(t, d, generator=g) < 0.4, x + torch.randn(t, d, generator=g) * step, x)
    exact = torch.arange(d) % 3 == 0
    at = (k * step).expand(t, d)
    pick = torch.rand(t, d, generator=g)
    x = torch.where(exact & (pick < 0.15), at, x)  # |v| == kmax exactly: a code
    x = torch.where(exact & (pick > 0.85), -torch.nextafter(at, torch.tensor(np.inf)), x)  # just past: escape
    if d > 1:
        x[:, 1] = torch.randn(t, generator=g) * 1e-6
    rows = list(range(t))
    if t >= 2:
        x[rows[1]] = center + torch.rand(d, generator=g) * step  # no escape
    if t >= 3:
        x[rows[2]] = x[rows[2]] * 1e4 + 50.0  # every value escapes: raw
    if t >= 5:
        for r, n in ((3, cfg.raw_limit), (4, cfg.raw_limit + 1)):
            x[r] = center
            x[r, torch.randperm(d, generator=g)[:n]] = 1e3  # n escapes
    return x.to(dtype)


def reference_encode(x: torch.Tensor, cfg: CodecConfigV2):
    sym, raw = v2mod.quantise(x, cfg, fused=False)
    escapes = x[~raw][sym[~raw] == cfg.escape_symbol]
    return sym, raw, escapes, x[raw], int((~torch.isfinite(x.float())).sum())


def reference_decode(x: torch.Tensor, sym: torch.Tensor, raw: torch.Tensor, cfg: CodecConfigV2) -> torch.Tensor:
    y = v2mod.dequantise(sym, cfg, x.dtype, fused=False)
    esc = sym == cfg.escape_symbol
    y[esc] = x[esc]
    y[raw] = x[raw]
    return y


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_encoded_equal(got, want) -> None:
    names = ("symbols", "raw", "escapes", "raw_values", "nonfinite")
    for name, g, w in zip(names, got, want, strict=True):
        if name == "nonfinite":
            assert g == w, (name, g, w)
            continue
        assert g.device.type == "cpu" and g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, g.shape, w.shape)
        assert torch.equal(bits(g), bits(w)), f"{name} differs at {(bits(g) != bits(w)).nonzero()[:5].tolist()}"


# ---------------------------------------------------------------- bit-exact encode and decode

SHAPES = [(1, 1), (1, 64), (3, 31), (6, 45), (2, 257), (5, 300)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t, d", SHAPES)
def test_device_pass_matches_reference_and_cpp(runner, dtype, t, d):
    cfg = make_config(d, seed=d)
    x = make_input(t, cfg, dtype, seed=7 * t + d)
    want = reference_encode(x, cfg)
    got = runner.encode(x, cfg)
    assert_encoded_equal(got, want)
    if t >= 3:
        assert bool(want[1][2]), "the all-escape token must be raw"
    if t >= 5:
        assert not bool(want[1][3]) and bool(want[1][4]), "raw_limit escapes code, raw_limit + 1 go raw"
    if v2mod.has_fused():  # the C++ pass agrees too
        enc = encode_v2(x, cfg)
        assert_encoded_equal(got, (enc.symbols, enc.raw, enc.escapes, enc.raw_values, 0))
    enc = EncodedV2(*got[:4], cfg)
    y = runner.decode(enc)
    assert y.dtype == dtype and y.shape == (t, d)
    assert torch.equal(bits(y), bits(reference_decode(x, want[0], want[1], cfg)))
    assert torch.equal(bits(y), bits(decode_v2(enc)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_device_pass_codes_around_a_frames_center_offsets(runner, dtype):
    """The moved centers of a frame with center offsets (docs/FORMATS.md §5.4.2) on the device are
    the host's: the same symbols as the reference quantiser around them, the same decode."""
    cfg = make_config(45, seed=11)
    x = make_input(6, cfg, dtype, seed=12)
    offsets = np.array([(c % 16) - 8 for c in range(45)], dtype=np.int8)
    center = frame_center.centers(cfg, offsets)
    got = v2_device.encode(x.to(runner.device), cfg, runner.encode_kernel, center)
    sym, raw = v2mod.quantise(x, cfg, fused=False, center=center)
    assert torch.equal(got[0], sym) and torch.equal(got[1], raw)
    enc = EncodedV2(*(t.clone() for t in got[:4]), cfg, center_offset=offsets)
    y = v2_device.decode(enc.symbols, enc.raw, enc.escapes, enc.raw_values, cfg, runner.device, runner.decode_kernel,
                         center).cpu()
    assert torch.equal(bits(y), bits(decode_v2(enc)))


def test_scan_carries_across_chunks(runner, monkeypatch):
    """More tokens than the scan handles at once (256 threads in CUDA; a 16-token chunk forced for
    Triton), with escapes and raw tokens spread over every chunk (the scan is dtype-blind: fp16)."""
    if runner.name == "triton":
        from splitkernels.triton import codec_v2_scan

        monkeypatch.setattr(codec_v2_scan, "_BLOCK_T", 16)
    t = 70 if runner.name == "triton" and INTERPRET else 260
    dtype = torch.float16
    cfg = make_config(3, seed=3, kmax=3, raw_limit=1)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(t, 3, generator=g) * torch.tensor(cfg.step_array()) * 3 + torch.tensor(cfg.center_array())
    x = x.to(dtype)
    want = reference_encode(x, cfg)
    assert want[1].any() and want[2].numel() > 0 and not want[1].all()
    got = runner.encode(x, cfg)
    assert_encoded_equal(got, want)
    assert torch.equal(bits(runner.decode(EncodedV2(*got[:4], cfg))), bits(reference_decode(x, want[0], want[1], cfg)))


@pytest.mark.parametrize("runner", ["cuda-emulation"], indirect=True)
def test_emulated_kernels_agree_under_every_interleaving(runner, emu_lib):
    """The emulation resumes a random runnable thread at each barrier: a missing barrier in the
    block counts, scans or ordered gathers would show up as a wrong result for some seed."""
    cfg = make_config(300, seed=11)
    x = make_input(5, cfg, torch.bfloat16, seed=12)
    want = reference_encode(x, cfg)
    dec_want = reference_decode(x, want[0], want[1], cfg)
    for seed in range(1, 5):
        emu_lib.emu_set_seed(ctypes.c_uint64(seed))
        got = runner.encode(x, cfg)
        assert_encoded_equal(got, want)
        assert torch.equal(bits(runner.decode(EncodedV2(*got[:4], cfg))), bits(dec_want)), seed


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_token_frames(runner, dtype, request):
    """A frame of one token (each decode step's) runs one launch each way in the cuda backend, with
    no scratch (the glue passes none): every kind of token of make_input (escapes, none, all
    escaped, raw_limit escapes, raw_limit + 1, a NaN) alone, bit-exact, under several thread
    interleavings in the emulation."""
    cfg = make_config(300, seed=21)
    rows = make_input(5, cfg, dtype, seed=22)
    nan_row = rows[0].clone()
    nan_row[7] = float("nan")
    emu_lib = request.getfixturevalue("emu_lib") if runner.name == "cuda-emulation" else None  # not built for GPUs
    for row in (*rows, nan_row):
        x = row[None]
        want = reference_encode(x, cfg)
        for seed in range(1, 4) if emu_lib is not None else range(1):
            if emu_lib is not None:
                emu_lib.emu_set_seed(ctypes.c_uint64(seed))
            got = runner.encode(x, cfg)
            assert_encoded_equal(got, want)
            if want[4]:
                continue  # a frame with a NaN is rejected before decoding
            y = runner.decode(EncodedV2(*got[:4], cfg))
            assert torch.equal(bits(y), bits(reference_decode(x, want[0], want[1], cfg))), seed


def test_non_finite_inputs_are_counted(runner):
    cfg = make_config(40, seed=2)
    x = make_input(4, cfg, torch.float16, seed=1)
    x[0, 5] = float("nan")
    x[3, 0] = float("inf")
    x[3, 1] = float("-inf")
    got = runner.encode(x, cfg)
    assert got[4] == 3
    want = reference_encode(x, cfg)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_empty_frame(runner):
    cfg = make_config(16, seed=1)
    x = torch.empty(0, 16)
    got = runner.encode(x, cfg)
    assert got[0].shape == (0, 16) and got[1].shape == (0,) and got[2].numel() == 0 and got[3].shape == (0, 16)
    assert got[4] == 0
    assert runner.decode(EncodedV2(*got[:4], cfg)).shape == (0, 16)


def test_decode_checks_counts_before_launching(runner):
    cfg = make_config(45, seed=4)
    x = make_input(6, cfg, torch.float32, seed=4)
    sym, raw, escapes, raw_values, _ = reference_encode(x, cfg)
    assert escapes.numel() > 0 and raw.any()
    for bad in (escapes[:-1], torch.cat([escapes, escapes[:1]])):
        with pytest.raises(ValueError, match="escape"):
            runner.decode(EncodedV2(sym, raw, bad, raw_values, cfg))
    with pytest.raises(ValueError, match="raw"):
        runner.decode(EncodedV2(sym, raw, escapes, raw_values[:-1], cfg))


def test_one_token_decode_checks_counts_before_its_one_launch(runner):
    """The one-launch decode of a single token trusts its escape count: the host check comes first."""
    cfg = make_config(45, seed=5)
    rows = make_input(5, cfg, torch.float32, seed=5)
    coded, raw_row = rows[0:1], rows[2:3]
    sym, raw, escapes, raw_values, _ = reference_encode(coded, cfg)
    assert escapes.numel() > 0 and not raw.any()
    for bad in (escapes[:-1], torch.cat([escapes, escapes[:1]])):
        with pytest.raises(ValueError, match="escape"):
            runner.decode(EncodedV2(sym, raw, bad, raw_values, cfg))
    sym, raw, escapes, raw_values, _ = reference_encode(raw_row, cfg)
    assert raw.all() and escapes.numel() == 0
    with pytest.raises(ValueError, match="raw"):
        runner.decode(EncodedV2(sym, raw, escapes, raw_values[:0], cfg))


def test_one_copy_unless_the_values_overflow_the_allowance(runner, monkeypatch):
    """A frame's symbols, flags, escapes and raw tokens come back in one device-to-host copy; a
    frame whose values exceed the spill allowance takes exactly one more, with the same result."""
    copies = []
    real = v2_device._to_host
    monkeypatch.setattr(v2_device, "_to_host", lambda src, dst: (copies.append(src.numel()), real(src, dst)))
    cfg = make_config(64, seed=8)
    x = make_input(6, cfg, torch.float16, seed=8)
    want = reference_encode(x, cfg)
    assert_encoded_equal(runner.encode(x, cfg), want)
    assert len(copies) == 1
    copies.clear()
    monkeypatch.setattr(v2_device, "SPILL_MIN_BYTES", 0)
    monkeypatch.setattr(v2_device, "SPILL_FRACTION", 1 << 20)
    assert_encoded_equal(runner.encode(x, cfg), want)
    assert len(copies) == 2


# ---------------------------------------------------------------- wiring


@pytest.mark.gpu
def test_public_codec_uses_the_device_pass(monkeypatch):
    """encode_v2 / decode_v2(device=...) / decode_frame go through the registered device kernels:
    Triton's on CPU tensors inside use_backend("triton") with the interpreter, the best GPU
    backend's on CUDA tensors."""
    if not INTERPRET and not HAS_GPU:
        pytest.skip("no device pass can run here: TRITON_INTERPRET=0 and no CUDA device")
    device = torch.device("cuda" if HAS_GPU else "cpu")
    calls = []
    for name in ("encode", "decode"):
        real = getattr(v2_device, name)
        monkeypatch.setattr(v2_device, name,
                            lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    cal = torch.randn(200, 48, generator=torch.Generator().manual_seed(3))
    cal[:, 7] *= 30.0
    cfg = calibrate(cal, bits=4.0)
    x = cal[:9].clone().half()
    x[0] = x[0] * 500.0  # a raw token
    host = encode_v2(x, cfg)  # CPU tensors, no backend forced: the host path
    assert calls == []
    def forced():
        return splitkernels.use_backend("triton") if device.type == "cpu" else contextlib.nullcontext()

    with forced():
        enc = encode_v2(x.to(device), cfg)
        y = decode_v2(enc, device=device)
        z = decode_frame(enc.to_bytes(), config=cfg, device=device)
    assert calls == ["encode", "decode", "decode"]
    assert enc.to_bytes() == host.to_bytes()
    assert torch.equal(bits(y.cpu()), bits(decode_v2(host))) and torch.equal(bits(z.cpu()), bits(y.cpu()))
    x[2, 3] = float("nan")
    with forced(), pytest.raises(ValueError, match="finite"):
        encode_v2(x.to(device), cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device: a one-token frame of a GPU tensor")
def test_one_token_frames_of_gpu_tensors_are_the_host_bytes():
    """encode_frame sends a one-token GPU tensor through the host's one-call encoder: the same bytes
    as the host path, shifted positions and raw tokens included (those take the general path)."""
    cal = torch.randn(400, 48, generator=torch.Generator().manual_seed(5))
    cal[:, 7] *= 30.0
    cfg = calibrate(cal, bits=4.0, sensitivity=torch.ones(48), position_sensitivity=torch.tensor([40.0] * 4 + [1.0] * 16))
    for seed, start, scale in ((0, 0, 1.0), (1, 2, 1.0), (2, 300, 1.0), (3, 300, 500.0)):
        x = (torch.randn(1, 48, generator=torch.Generator().manual_seed(seed)) * scale).half()
        assert encode_frame(x.cuda(), cfg, start=start) == encode_v2(x, cfg, start).to_bytes(), (seed, start)


def test_without_a_device_kernel_the_host_path_runs():
    assert v2_device.kernel(v2_device.ENCODE_OP, torch.device("cpu")) is None
    with splitkernels.use_backend("reference"):
        assert v2_device.kernel(v2_device.DECODE_OP, torch.device("cpu")) is None


def test_layout_offsets_are_aligned_and_match_the_cuda_header():
    for t, d, item in ((1, 1, 2), (3, 31, 4), (17, 4096, 2)):
        lay = v2_device.layout(t, d, item)
        assert lay.sym_off % 16 == 0 and lay.val_off % 16 == 0
        assert lay.sym_off >= v2_device.HEADER_BYTES + t and lay.val_off >= lay.sym_off + t * d
        assert lay.capacity == lay.val_off + t * d * item
    assert EmulatedModule.V2_HEADER_BYTES == v2_device.HEADER_BYTES
    from splitkernels._native import load

    module, _ = load("_C_cuda")
    if module is not None:  # the built extension's constant (launchers.h)
        assert module.V2_HEADER_BYTES == v2_device.HEADER_BYTES


def test_cuda_launchers_validate_before_launching():
    """The compiled launchers reject bad sizes and offsets on the host (no GPU needed to check)."""
    from splitkernels._native import load

    module, reason = load("_C_cuda")
    if module is None:
        pytest.skip(f"the CUDA extension is not built here ({reason})")
    enc = dict(x=0, dtype=1, t=2, d=8, center=0, inv=0, kmax=7, raw_limit=2, packed=0, sym_off=48, val_off=64,
               scratch=0, stream=0)
    for bad, match in ((dict(t=0), "T"), (dict(d=0), "d"), (dict(kmax=0), "kmax"), (dict(raw_limit=9), "raw_limit"),
                       (dict(dtype=7), "dtype"), (dict(sym_off=40), "offsets"), (dict(val_off=48), "offsets")):
        with pytest.raises(ValueError, match=match):
            module.v2_encode(**{**enc, **bad})
    dec = dict(packed=0, sym_off=48, val_off=64, n_escapes=0, t=2, d=8, step=0, center=0, kmax=7, dtype=0, out=0,
               scratch=0, stream=0)
    for bad, match in ((dict(n_escapes=-1), "n_escapes"), (dict(kmax=128), "kmax"), (dict(dtype=3), "dtype"),
                       (dict(sym_off=32), "offsets")):
        with pytest.raises(ValueError, match=match):
            module.v2_decode(**{**dec, **bad})
