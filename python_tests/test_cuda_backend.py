"""The cuda backend (csrc/cuda) against the reference.

* ``gpu`` tests run the kernels through ``splitkernels.ops`` on a CUDA device and compare with
  the reference computed on the CPU (whose fp32 division is IEEE, as docs/FORMATS.md requires;
  torch's CUDA division by a Python scalar multiplies by a reciprocal instead).
* Without a GPU the backend must say why it is unavailable, and the same kernel source runs
  under a host-side emulation of the CUDA features it uses (csrc/cuda/emulation: each CUDA
  thread of a block is a fiber on the calling OS thread, blocks run one after another) on small
  shapes, so a logic error fails CI without a GPU.

Integer outputs must be identical; matmuls agree within the documented relative Frobenius
error (1e-3 for fp16/bf16 activations, 1e-5 for fp32).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import splitkernels
from splitkernels import ops
from splitkernels.formats.dtypes import raw_width
from splitkernels.ops import reference
from splitkernels.quant import quantize_weight

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.is_available()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MATMUL_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")


# ---------------------------------------------------------------- data


def activations(t: int, d: int, dtype: torch.dtype, kind: str, seed: int) -> torch.Tensor:
    """Fresh random rows with the structures the codec must handle."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g)
    if kind == "heavy":  # a few channels at 10-13x rms in every token
        for c in {3 % d, (d // 2) % d, (d - 1) % d}:
            x[:, c] *= 10 + 3 * torch.rand(t, generator=g)
    elif kind == "sink":  # position 0 carries one massive value
        x[0, 1 % d] = 23000.0
        x[0, 0] = -4000.0
    elif kind == "ties":  # few distinct magnitudes: capacity selection must break ties by channel
        x = torch.randint(-3, 4, (t, d), generator=g).float() * 1.5
    elif kind == "constant":  # step 0 rows and a row of equal outliers
        x = torch.full((t, d), 0.75)
        if t > 1:
            x[1] = torch.randn(d, generator=g) * 1e-3
    elif kind == "tiny":  # steps in the fp16 subnormal range
        x = x * 1e-6
    return x.to(dtype)


def assert_encode_equal(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    names = ("bits", "lo", "step", "hi", "cnt", "idx", "val", "codes", "nbytes")
    for name, g, w in zip(names, got, want, strict=True):
        g = g.cpu()
        assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, g.shape, w.dtype, w.shape)
        assert torch.equal(g, w), f"{name} differs at {(g != w).nonzero()[:5].tolist()}"


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


# (T, d, kind, abs_threshold, threshold, capacity, menu, eps): odd d, T = 1, rows over one
# block width, capacity 0 / 1 / d / below the candidate count, forced ties.
CODEC_CASES = [
    (1, 1, "normal", False, 4.0, 1, [2, 3, 4, 5, 6, 8], 0.05),
    (3, 37, "normal", False, 1.0, 4, [2, 3, 4, 5, 6, 8], 0.05),
    (4, 300, "heavy", False, 4.0, 2, [2, 3, 4, 5, 6, 8], 0.02),
    (3, 300, "heavy", False, 4.0, 0, [4], 1e9),
    (2, 257, "sink", False, 4.0, 3, [3, 5, 8], 0.01),
    (3, 96, "ties", True, 3.0, 5, [1, 2, 7], 0.1),  # |x| == tau is an inlier
    (2, 64, "ties", True, -1.0, 64, [2, 4], 0.5),
    (2, 33, "constant", False, 1.0, 2, [2, 4], 0.05),
    (2, 50, "tiny", False, 3.0, 1, [2, 4, 8], 0.05),
    (2, 40, "normal", False, 4.0, 1, [], 0.05),
    (2, 45, "normal", False, 2.0, 3, [2, 4], 0.0),
]


# ---------------------------------------------------------------- without a GPU


@pytest.mark.skipif(HAS_GPU, reason="checks the report on machines without a CUDA device")
def test_backend_reports_why_it_is_unavailable():
    info = splitkernels.backends()["cuda"]
    assert info["available"] is False and info["devices"] == [] and info["ops"] == []
    assert isinstance(info["reason"], str) and info["reason"]
    with pytest.raises(RuntimeError, match="cuda.*not available"):
        with splitkernels.use_backend("cuda"):
            pass


def _cuda_include() -> Path | None:
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        candidates += [real.parent.parent / "include", real.parent.parent / "targets/x86_64-linux/include"]
    candidates.append(Path("/usr/local/cuda/include"))
    return next((c for c in candidates if (c / "cuda_fp16.h").exists()), None)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The kernels compiled for the host under csrc/cuda/emulation (needs g++ and the CUDA headers)."""
    return _build_emulation(ROOT / "csrc", tmp_path_factory.mktemp("cuda_emulation") / "sk_cuda_emulation.so")


def _build_emulation(csrc: Path, lib: Path) -> ctypes.CDLL:
    include = _cuda_include()
    cxx = shutil.which("g++") or shutil.which("c++")
    if include is None or cxx is None:
        pytest.skip("the CUDA emulation needs a C++20 compiler and the CUDA toolkit headers")
    cmd = [cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-Wno-unknown-pragmas",
           f"-I{include}", f"-I{csrc}", str(csrc / "cuda/emulation/emulation.cpp"), "-o", str(lib), "-lpthread"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return ctypes.CDLL(str(lib))


def _p(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _poisoned(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """An output buffer full of 0xA5 bytes, so any byte a kernel forgets to write shows up."""
    t = torch.empty(*shape, dtype=dtype)
    if t.numel():
        t.view(torch.uint8).fill_(0xA5)
    return t


I64, F64 = ctypes.c_int64, ctypes.c_double


def test_emulated_pack_unpack_match_reference(emu):
    g = torch.Generator().manual_seed(1)
    for bits in range(1, 9):
        for rows, n in ((1, 1), (3, 37), (2, 70)):
            codes = torch.randint(0, 2**bits, (rows, n), generator=g, dtype=torch.uint8)
            want = reference.pack_bits(codes, bits)
            packed = _poisoned(rows, want.shape[1], dtype=torch.uint8)
            emu.emu_pack_bits(_p(codes), _p(packed), I64(rows), I64(n), ctypes.c_int(bits))
            assert torch.equal(packed, want), (bits, n)
            wide = torch.cat([want, torch.randint(0, 256, (rows, 3), generator=g, dtype=torch.uint8)], 1)
            back = _poisoned(rows, n, dtype=torch.uint8)
            emu.emu_unpack_bits(_p(wide), _p(back), I64(rows), I64(n), I64(wide.shape[1]), ctypes.c_int(bits))
            assert torch.equal(back, codes), (bits, n)


def _emu_encode(emu, x, abs_threshold, threshold, capacity, menu, eps, forced):
    t, d = x.shape
    out = (
        _poisoned(t, dtype=torch.uint8), _poisoned(t, dtype=torch.float16), _poisoned(t, dtype=torch.float16),
        _poisoned(t, dtype=torch.float32), _poisoned(t, dtype=torch.int32), _poisoned(t, capacity, dtype=torch.int32),
        _poisoned(t, capacity, dtype=x.dtype), _poisoned(t, d * x.element_size(), dtype=torch.uint8),
        _poisoned(t, dtype=torch.int32),
    )
    mask = sum(1 << (b - 1) for b in set(menu))
    emu.emu_ts_tabq_encode(
        _p(x), ctypes.c_int(DTYPE_CODE[x.dtype]), I64(t), I64(d), ctypes.c_bool(abs_threshold), F64(threshold),
        I64(capacity), ctypes.c_int(mask), F64(eps), _p(forced), *(_p(o) for o in out),
    )
    return out


def _emu_decode(emu, enc, d):
    bits, lo, step, _hi, cnt, idx, val, codes, _nb = enc
    t = bits.shape[0]
    out = _poisoned(t, d, dtype=val.dtype)
    emu.emu_ts_tabq_decode(
        _p(bits), _p(lo), _p(step), _p(cnt), _p(idx), _p(val), _p(codes), ctypes.c_int(DTYPE_CODE[val.dtype]),
        I64(t), I64(d), I64(idx.shape[1]), I64(codes.shape[1]), _p(out),
    )
    return out


@pytest.mark.parametrize("case", CODEC_CASES, ids=lambda c: f"T{c[0]}-d{c[1]}-{c[2]}-C{c[5]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_codec_matches_reference(emu, case, dtype):
    t, d, kind, abs_threshold, threshold, capacity, menu, eps = case
    x = activations(t, d, dtype, kind, seed=d + t)
    want = reference.ts_tabq_encode(x, abs_threshold, threshold, capacity, menu, eps, None)
    got = _emu_encode(emu, x, abs_threshold, threshold, capacity, menu, eps, None)
    assert_encode_equal(got, want)
    assert torch.equal(_emu_decode(emu, got, d), reference.ts_tabq_decode(*want[:3], *want[4:8], d))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_codec_forced_widths(emu, dtype):
    x = activations(6, 75, dtype, "heavy", seed=5)
    x[5] = 0.0
    x[4, 0] = 60000.0  # lo/step of some widths overflow fp16: those tokens fall back to raw
    forced = torch.tensor([1, 3, 8, 5, 2, raw_width(dtype)], dtype=torch.uint8)
    want = reference.ts_tabq_encode(x, False, 3.0, 2, [], 0.0, forced)
    got = _emu_encode(emu, x, False, 3.0, 2, [], 0.0, forced)
    assert_encode_equal(got, want)
    assert torch.equal(_emu_decode(emu, got, 75), reference.ts_tabq_decode(*want[:3], *want[4:8], 75))


def _emu_gemv(emu, x, q, bias, splits):
    """One emulated GEMV launch; returns y and the tile counters, which must be zero again."""
    m, k = x.shape
    n = q.qweight.shape[0]
    y = _poisoned(m, n, dtype=x.dtype)
    partial = _poisoned(splits, m, n, dtype=torch.float32)  # every partial is written before it is read
    tile_done = torch.zeros(-(-n // 16), dtype=torch.int32)
    emu.emu_lowbit_gemv(_p(x), _p(q.qweight), _p(q.scale), _p(q.zero), _p(bias), _p(y),
                        ctypes.c_int(DTYPE_CODE[x.dtype]), I64(m), I64(n), I64(k), ctypes.c_int(q.bits),
                        I64(q.group_size), ctypes.c_int(splits), _p(partial), _p(tile_done))
    return y, tile_done


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_gemv_and_dequant_match_reference(emu, bits, dtype):
    g = torch.Generator().manual_seed(bits)
    n, k, group = 11, 192, 64
    w = torch.randn(n, k, generator=g)
    qw = quantize_weight(w, bits, group, dtype=dtype)
    deq = _poisoned(n, k, dtype=torch.float32)
    emu.emu_dequantize_weight(_p(qw.qweight), _p(qw.scale), _p(qw.zero), _p(deq), ctypes.c_int(DTYPE_CODE[dtype]),
                              I64(n), I64(k), ctypes.c_int(bits), I64(group))
    want_w = reference.dequantize_weight(qw.qweight, qw.scale.float(), qw.zero.float(), bits, group, k)
    assert torch.equal(deq, want_w)
    bias = torch.randn(n, generator=g).to(dtype)
    # K = 4160: 130 chunks of 32 codes, so lanes take several unrolled chunks and some fall short.
    long_qw = quantize_weight(torch.randn(n, 4160, generator=g), bits, 64, dtype=dtype)
    for m, b, q in ((1, None, qw), (3, bias, qw), (8, None, qw), (16, bias, qw), (1, bias, long_qw),
                    (3, None, long_qw)):
        x = torch.randn(m, q.in_features, generator=g).to(dtype)
        y, _ = _emu_gemv(emu, x, q, b, 1)
        want = reference.lowbit_linear(x, q.qweight, q.scale, q.zero, bits, 64, b)
        assert rel_err(y, want) <= MATMUL_TOL[dtype], (m, q.in_features, b is None)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_emulated_gemv_every_m_and_split_k(emu, bits):
    # N = 37: two full row tiles and a third whose last warp has one row; K = 2048 (64 chunks)
    # splits in two; 3 and 16 splits normalise to 2 and 2; every M bucket (1, 2, 3..4, 5..8, 9..16).
    g = torch.Generator().manual_seed(40 + bits)
    n, k = 37, 2048
    for dtype in (torch.float32, torch.float16):
        q = quantize_weight(torch.randn(n, k, generator=g), bits, 128 if bits != 3 else 64, dtype=dtype)
        bias = torch.randn(n, generator=g).to(dtype)
        for m, splits, b in ((1, 1, None), (1, 2, bias), (2, 3, None), (4, 2, bias), (5, 1, bias), (8, 2, None),
                             (9, 16, bias), (12, 1, None), (16, 2, bias)):
            x = torch.randn(m, k, generator=g).to(dtype)
            y, tile_done = _emu_gemv(emu, x, q, b, splits)
            want = reference.lowbit_linear(x, q.qweight, q.scale, q.zero, bits, q.group_size, b)
            assert rel_err(y, want) <= MATMUL_TOL[dtype], (dtype, m, splits, b is None)
            assert not tile_done.any(), "split-K must leave its tile counters at zero"


def test_emulated_tensor_core_gemv(emu):
    # W4 with fp16/bf16 activations, M = 2..32 and group_size % 128 == 0 runs on tensor cores (above
    # 16 tokens in passes of 16): N = 70 leaves the second 64-row tile's last warp with rows past N;
    # K = 2048 with 2 splits; groups of 128 (one per 128-code block) and 256 (two blocks each);
    # tokens g + 8 absent below M = 9 and in the last pass of M = 24.
    g = torch.Generator().manual_seed(77)
    n, k = 70, 2048
    for dtype in (torch.float16, torch.bfloat16):
        for group in (128, 256):
            q = quantize_weight(torch.randn(n, k, generator=g), 4, group, dtype=dtype)
            bias = torch.randn(n, generator=g).to(dtype)
            for m, splits, b in ((5, 1, bias), (8, 2, None), (9, 2, bias), (16, 1, None), (16, 2, bias),
                                 (24, 2, bias), (32, 1, None)):
                x = torch.randn(m, k, generator=g).to(dtype)
                x[:, 5] *= 30  # a heavy channel, as in real hidden states
                y, tile_done = _emu_gemv(emu, x, q, b, splits)
                want = reference.lowbit_linear(x, q.qweight, q.scale, q.zero, 4, group, b)
                assert rel_err(y, want) <= MATMUL_TOL[dtype], (dtype, group, m, splits, b is None)
                assert not tile_done.any()


def test_emulated_tensor_core_gemv_small_m(emu):
    # The launcher sends M >= 2 to tensor cores, but the threshold can move (to 1): the kernel
    # must be right for M = 1..4 too (tokens 4..15 of the MMA absent).
    g = torch.Generator().manual_seed(78)
    q = quantize_weight(torch.randn(21, 1024, generator=g), 4, 128, dtype=torch.bfloat16)
    bias = torch.randn(21, generator=g).bfloat16()
    emu.emu_set_tc_min_m(1)
    try:
        # One 64-row tile: split-K to the cap of two 128-code blocks a split.
        assert emu.emu_gemv_splits(I64(1), I64(21), I64(1024), 4, I64(128), 2, 132) == 4
        for m, splits in ((1, 1), (2, 4), (3, 1), (4, 3)):
            x = torch.randn(m, 1024, generator=g).bfloat16()
            y, tile_done = _emu_gemv(emu, x, q, bias, splits)
            want = reference.lowbit_linear(x, q.qweight, q.scale, q.zero, 4, 128, bias)
            assert rel_err(y, want) <= MATMUL_TOL[torch.bfloat16], m
        emu.emu_set_tc_min_m(33)  # tensor cores off: above 16 tokens nothing is fused
        emu.emu_gemv_fused.restype = ctypes.c_bool
        assert not emu.emu_gemv_fused(I64(20), I64(1024), 4, I64(128), 2)
        assert emu.emu_gemv_fused(I64(16), I64(1024), 4, I64(128), 2)
    finally:
        emu.emu_set_tc_min_m(2)  # the launcher's kGemvTcMinM


def test_emulated_gemv_prefetch_variant(emu):
    # The CUDA-core kernel with the next step's loads issued early (bench/gpu_gemv_sweep.py times
    # it) must give the default kernel's results: K = 1152 is 36 chunks (lanes past the end), K =
    # 4160 130 chunks (three steps a lane, the last one short); with and without split-K, every
    # bit width, and M = 3 (which keeps the default kernel).
    g = torch.Generator().manual_seed(90)
    emu.emu_set_gemv_variant(1)  # kVariantCcPrefetch
    try:
        for dtype, bits, k, group in ((torch.float16, 4, 1152, 128), (torch.bfloat16, 2, 4160, 64),
                                      (torch.float32, 3, 4160, 64), (torch.bfloat16, 8, 1152, 128)):
            q = quantize_weight(torch.randn(21, k, generator=g), bits, group, dtype=dtype)
            bias = torch.randn(21, generator=g).to(dtype)
            for m, splits, b in ((1, 1, bias), (1, 2, None), (3, 2, bias)):
                x = torch.randn(m, k, generator=g).to(dtype)
                y, tile_done = _emu_gemv(emu, x, q, b, splits)
                want = reference.lowbit_linear(x, q.qweight, q.scale, q.zero, bits, group, b)
                assert rel_err(y, want) <= MATMUL_TOL[dtype], (dtype, bits, k, m, splits)
                assert not tile_done.any()
    finally:
        emu.emu_set_gemv_variant(0)


def test_emulated_gemv_split_policy(emu):
    def splits(m, n, k, bits=4, group=128, dtype=1, sms=132):
        return emu.emu_gemv_splits(I64(m), I64(n), I64(k), ctypes.c_int(bits), I64(group), ctypes.c_int(dtype), sms)

    # 4096 x 4096 on 132 SMs: 256 row tiles of 4 warps want 2 splits (64 chunks each).
    assert splits(1, 4096, 4096) == 2
    assert splits(1, 4096, 14336) == 3
    assert splits(1, 14336, 4096) == 1  # enough rows alone
    assert splits(1, 576, 1536, group=64) == 1  # under 32 chunks per split
    assert splits(1, 16, 1 << 20, sms=1000) == 16  # at most 16
    assert splits(1, 4096, 4096, sms=1) == 1
    # The tensor-core kernel's blocks take 64 rows: fewer warps, more splits, in whole 128-code
    # blocks (9 wanted: 128 chunks in 8 splits of 16).
    assert splits(16, 4096, 4096) == 8
    assert splits(16, 4096, 1024) == 4  # at least two blocks a split
    assert splits(16, 4096, 4096, dtype=0) == 2  # fp32 activations stay on CUDA cores
    assert splits(16, 4096, 4096, group=64) == 2


def test_cuda_gemv_launcher_validates_before_launching():
    """The compiled GEMV launcher rejects what its kernels do not take, on the host (no GPU needed)."""
    from splitkernels._native import load

    module, reason = load("_C_cuda")
    if module is None:
        pytest.skip(f"the CUDA extension is not built here ({reason})")
    args = dict(x=0, qweight=0, scale=0, zero=0, bias=0, y=0, dtype=1, m=1, n=8, k=256, bits=4, group_size=128,
                splits=1, partial=0, tile_done=0, stream=0)
    for bad, match in ((dict(m=17, bits=3), "M in 1..16"), (dict(m=33), "M in 1..16"),
                       (dict(m=20, dtype=0), "M in 1..16"), (dict(bits=5), "bits"), (dict(group_size=48), "group_size"),
                       (dict(k=200), "group_size"), (dict(splits=0), "splits"), (dict(splits=17), "splits"),
                       (dict(k=4096, splits=2), "split-K"), (dict(x=8), "aligned")):
        with pytest.raises(ValueError, match=match):
            module.lowbit_gemv(**{**args, **bad})
    assert module.gemv_fused(32, 4096, 4, 128, 1) and not module.gemv_fused(33, 4096, 4, 128, 1)
    assert module.gemv_fused(16, 4096, 3, 64, 0) and not module.gemv_fused(17, 4096, 4, 128, 0)
    for bad in (-2, 2):  # the variant switch takes -1 (read) and 0..1 only
        with pytest.raises(ValueError, match=r"gemv_variant: value must be in 0\.\.1"):
            module.gemv_variant(bad)
    assert module.gemv_variant(-1) == 0  # and a rejected value changed nothing


class EmulatedModule:
    """Stands in for splitkernels._C_cuda with the emulated kernels, so the torch glue in
    splitkernels/_backends/cuda.py (argument order, allocation, shapes, fallbacks) runs on CPU tensors."""

    GEMV_TILE_ROWS = 16
    CODEC_MAX_D = 40 * 1024 * 8
    SM_COUNT = 2  # a small device, so the glue's small shapes take the split-K path too

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib

    def pack_bits(self, codes, packed, rows, n, bits, stream):
        self.lib.emu_pack_bits(ctypes.c_void_p(codes), ctypes.c_void_p(packed), I64(rows), I64(n), ctypes.c_int(bits))

    def unpack_bits(self, packed, codes, rows, n, stride, bits, stream):
        self.lib.emu_unpack_bits(ctypes.c_void_p(packed), ctypes.c_void_p(codes), I64(rows), I64(n), I64(stride),
                                 ctypes.c_int(bits))

    def ts_tabq_encode(self, x, dtype, t, d, abs_threshold, threshold, capacity, menu, eps, forced, *outs_stream):
        *outs, _stream = outs_stream
        self.lib.emu_ts_tabq_encode(
            ctypes.c_void_p(x), ctypes.c_int(dtype), I64(t), I64(d), ctypes.c_bool(abs_threshold), F64(threshold),
            I64(capacity), ctypes.c_int(menu), F64(eps), ctypes.c_void_p(forced), *(ctypes.c_void_p(o) for o in outs),
        )

    def ts_tabq_decode(self, bits, lo, step, cnt, idx, val, codes, dtype, t, d, capacity, stride, out, stream):
        self.lib.emu_ts_tabq_decode(
            *(ctypes.c_void_p(a) for a in (bits, lo, step, cnt, idx, val, codes)), ctypes.c_int(dtype), I64(t), I64(d),
            I64(capacity), I64(stride), ctypes.c_void_p(out),
        )

    V2_HEADER_BYTES = 32

    def v2_encode(self, x, dtype, t, d, center, inv, kmax, raw_limit, packed, sym_off, val_off, scratch, stream):
        self.lib.emu_v2_encode(
            ctypes.c_void_p(x), ctypes.c_int(dtype), I64(t), I64(d), ctypes.c_void_p(center), ctypes.c_void_p(inv),
            ctypes.c_int(kmax), I64(raw_limit), ctypes.c_void_p(packed), I64(sym_off), I64(val_off),
            ctypes.c_void_p(scratch),
        )

    def v2_decode(self, packed, sym_off, val_off, n_escapes, t, d, step, center, kmax, dtype, out, scratch, stream):
        self.lib.emu_v2_decode(
            ctypes.c_void_p(packed), I64(sym_off), I64(val_off), I64(n_escapes), I64(t), I64(d), ctypes.c_void_p(step),
            ctypes.c_void_p(center), ctypes.c_int(kmax), ctypes.c_int(dtype), ctypes.c_void_p(out),
            ctypes.c_void_p(scratch),
        )

    def gemv_fused(self, m, k, bits, group_size, dtype):
        self.lib.emu_gemv_fused.restype = ctypes.c_bool
        return self.lib.emu_gemv_fused(I64(m), I64(k), ctypes.c_int(bits), I64(group_size), ctypes.c_int(dtype))

    def gemv_splits(self, m, n, k, bits, group_size, dtype):
        return self.lib.emu_gemv_splits(I64(m), I64(n), I64(k), ctypes.c_int(bits), I64(group_size),
                                        ctypes.c_int(dtype), self.SM_COUNT)

    def lowbit_gemv(self, x, qweight, scale, zero, bias, y, dtype, m, n, k, bits, group_size, splits, partial,
                    tile_done, stream):
        self.lib.emu_lowbit_gemv(
            *(ctypes.c_void_p(a) for a in (x, qweight, scale, zero, bias, y)), ctypes.c_int(dtype), I64(m), I64(n),
            I64(k), ctypes.c_int(bits), I64(group_size), ctypes.c_int(splits), ctypes.c_void_p(partial),
            ctypes.c_void_p(tile_done),
        )

    def dequantize_weight(self, qweight, scale, zero, w, dtype, n, k, bits, group_size, stream):
        self.lib.emu_dequantize_weight(
            *(ctypes.c_void_p(a) for a in (qweight, scale, zero, w)), ctypes.c_int(dtype), I64(n), I64(k),
            ctypes.c_int(bits), I64(group_size),
        )


@pytest.fixture
def glue(emu, monkeypatch):
    """splitkernels._backends.cuda with its extension replaced by the emulation, on CPU tensors."""
    import contextlib

    from splitkernels._backends import cuda as glue_module

    monkeypatch.setattr(glue_module, "_C", EmulatedModule(emu))
    monkeypatch.setattr(glue_module, "_require_cuda", lambda name, t: None)
    monkeypatch.setattr(glue_module, "_stream", lambda device: 0)
    monkeypatch.setattr(glue_module, "_capturing", lambda: False)
    monkeypatch.setattr(glue_module, "_GEMV_SPLITS", {})
    monkeypatch.setattr(glue_module, "_GEMV_FUSED", {})
    monkeypatch.setattr(glue_module, "_GEMV_TILE_DONE", {})
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    return glue_module


def test_glue_with_emulated_kernels(glue):
    g = torch.Generator().manual_seed(21)
    codes = torch.randint(0, 32, (2, 3, 41), generator=g, dtype=torch.uint8)
    packed = glue.pack_bits(codes, 5)
    assert torch.equal(packed, reference.pack_bits(codes, 5))
    wide = torch.cat([packed, torch.zeros(2, 3, 2, dtype=torch.uint8)], -1)
    assert torch.equal(glue.unpack_bits(wide, 5, 41), codes)
    for dtype in DTYPES:
        x = activations(3, 130, dtype, "heavy", seed=4)
        want = reference.ts_tabq_encode(x, False, 4.0, 2, [2, 4, 6], 0.05, None)
        got = glue.ts_tabq_encode(x, False, 4.0, 2, [2, 4, 6], 0.05, None)
        assert_encode_equal(got, want)
        forced = torch.tensor([3, 0, 8], dtype=torch.uint8)
        assert_encode_equal(glue.ts_tabq_encode(x, False, 4.0, 2, [], 0.0, forced),
                            reference.ts_tabq_encode(x, False, 4.0, 2, [], 0.0, forced))
        # codes rows of odd width at an odd offset: the glue copies them into element alignment
        codes_odd = torch.zeros(3, got[7].shape[1] + 2, dtype=torch.uint8)[:, 1:]
        codes_odd[:, : got[7].shape[1]] = got[7]
        dec = glue.ts_tabq_decode(*got[:3], *got[4:7], codes_odd, 130)
        assert torch.equal(dec, reference.ts_tabq_decode(*want[:3], *want[4:8], 130))
    # GEMV (K = 2048 splits K in two on the emulated device, twice to reuse the tile counters),
    # then the dequantise + matmul fallbacks (M over 16, a group size the GEMV does not take).
    for m, k, group in ((2, 192, 64), (16, 192, 64), (3, 2048, 64), (3, 2048, 64), (17, 192, 64), (1, 192, 48)):
        qw = quantize_weight(torch.randn(10, k, generator=g), 3, group, dtype=torch.float16)
        x = torch.randn(m, k, generator=g).half()
        bias = torch.randn(10, generator=g).half()
        got = glue.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 3, group, bias)
        want = reference.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 3, group, bias)
        assert got.dtype == torch.float16 and rel_err(got, want) <= MATMUL_TOL[torch.float16], (m, k, group)
    assert glue._GEMV_SPLITS[(None, 3, 10, 2048, 3, 64, 1)] == 2
    # W4, fp16, M = 8, group 128: the tensor-core kernel, split in eight (one wave of the 2-SM
    # device holds 8 blocks of its one row tile).
    qw = quantize_weight(torch.randn(10, 2048, generator=g), 4, 128, dtype=torch.float16)
    x = torch.randn(8, 2048, generator=g).half()
    got = glue.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 4, 128, None)
    want = reference.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 4, 128, None)
    assert rel_err(got, want) <= MATMUL_TOL[torch.float16]
    assert glue._GEMV_SPLITS[(None, 8, 10, 2048, 4, 128, 1)] == 8
    # Above 16 tokens only that kernel stays fused (two passes of 16), up to 32.
    for m, fused in ((20, True), (32, True), (33, False)):
        x = torch.randn(m, 2048, generator=g).half()
        got = glue.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 4, 128, None)
        want = reference.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 4, 128, None)
        assert rel_err(got, want) <= MATMUL_TOL[torch.float16], m
        assert glue._GEMV_FUSED[(m, 2048, 4, 128, torch.float16)] is fused
    assert not glue._gemv_shape_ok(17, 2048, 4, 128, torch.float32)
    assert all(not done.any() for done in glue._GEMV_TILE_DONE.values()) and glue._GEMV_TILE_DONE


# ---------------------------------------------------------------- on a GPU


@pytest.fixture
def cuda_backend():
    if not HAS_GPU:
        pytest.skip("needs a CUDA device")
    info = splitkernels.backends()["cuda"]
    if not info["available"]:
        pytest.fail(f"a CUDA device is present but the cuda backend is unavailable: {info['reason']}")
    with splitkernels.use_backend("cuda"):
        yield


def _poison_allocator(nbytes: int = 64 << 20) -> None:
    """Fill memory the caching allocator will hand out next with 0xA5, so unwritten outputs show up."""
    junk = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    junk.fill_(0xA5)
    del junk


@pytest.mark.gpu
@pytest.mark.parametrize("bits", range(1, 9))
def test_gpu_pack_unpack(cuda_backend, bits):
    g = torch.Generator().manual_seed(bits)
    for shape in ((1, 1), (5, 37), (3, 2, 1000), (0, 9), (4, 0)):
        codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.uint8)
        _poison_allocator()
        packed = ops.pack_bits(codes.cuda(), bits)
        assert torch.equal(packed.cpu(), reference.pack_bits(codes, bits)), shape
        assert torch.equal(ops.unpack_bits(packed, bits, shape[-1]).cpu(), codes), shape


GPU_CODEC_CASES = CODEC_CASES + [
    (64, 4096, "heavy", False, 4.0, 8, [2, 3, 4, 5, 6, 8], 0.05),
    (17, 4096, "sink", False, 4.0, 16, [3, 4, 5, 6, 8], 0.02),
    (5, 16384, "heavy", False, 4.0, 2, [4, 8], 0.03),
    (3, 5001, "ties", True, 2.0, 700, [2, 4], 0.1),
    (1, 2049, "normal", False, 2.0, 2049, [2, 4], 0.05),
    (2, 40 * 1024 * 8, "heavy", False, 4.0, 4, [4, 8], 0.03),  # the widest row the kernel takes
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CODEC_CASES, ids=lambda c: f"T{c[0]}-d{c[1]}-{c[2]}-C{c[5]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_codec_matches_reference(cuda_backend, case, dtype):
    t, d, kind, abs_threshold, threshold, capacity, menu, eps = case
    x = activations(t, d, dtype, kind, seed=d * 7 + t)
    want = reference.ts_tabq_encode(x, abs_threshold, threshold, capacity, menu, eps, None)
    _poison_allocator()
    got = ops.ts_tabq_encode(x.cuda(), abs_threshold, threshold, capacity, menu, eps)
    assert_encode_equal(got, want)
    _poison_allocator()
    dec = ops.ts_tabq_decode(*got[:3], *got[4:8], d)
    assert torch.equal(dec.cpu(), reference.ts_tabq_decode(*want[:3], *want[4:8], d))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_codec_forced_widths_and_public_codec(cuda_backend, dtype):
    from splitkernels.codec import CodecConfig, decode, encode

    x = activations(6, 75, dtype, "heavy", seed=5)
    x[5] = 0.0
    x[4, 0] = 60000.0
    forced = torch.tensor([1, 3, 8, 5, 2, raw_width(dtype)], dtype=torch.uint8)
    want = reference.ts_tabq_encode(x, False, 3.0, 2, [], 0.0, forced)
    got = ops.ts_tabq_encode(x.cuda(), False, 3.0, 2, [], 0.0, forced.cuda())
    assert_encode_equal(got, want)
    y = activations(33, 576, dtype, "sink", seed=9)
    for config in (CodecConfig(), CodecConfig.passthrough()):
        frame = encode(y.cuda(), config).to_bytes()
        with splitkernels.use_backend("reference"):  # the CPU side: this test forces cuda
            assert frame == encode(y, config).to_bytes()
            want = decode(encode(y, config))
        assert torch.equal(decode(encode(y.cuda(), config)).cpu(), want)


def test_cuda_glue_hands_prefill_sizes_to_triton_unless_a_backend_is_forced():
    from splitkernels._backends import cuda as glue
    from splitkernels.registry import get_backend

    # Products the fused GEMV does not take go to Triton's lowbit_linear where it exists
    # (unavailable Triton: None, the glue's own dequantise + matmul); a forced backend keeps its own.
    assert glue._larger_m_kernel() is get_backend("triton").kernels.get("lowbit_linear")
    with splitkernels.use_backend("reference"):
        assert glue._larger_m_kernel() is None


@pytest.mark.gpu
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_lowbit_linear(cuda_backend, bits, dtype):
    g = torch.Generator().manual_seed(10 + bits)
    # (N, K, group): GEMV shapes, then group sizes the GEMV does not take (dequantise + matmul).
    # (300, 4096, 128) splits K on any GPU with 5 or more SMs.
    for n, k, group in ((1536, 576, 64), (257, 1024, 128), (300, 4096, 128), (40, 96, 32), (24, 60, 12)):
        w = torch.randn(n, k, generator=g)
        qw = quantize_weight(w, bits, group, dtype=dtype).to("cuda")
        bias = torch.randn(n, generator=g).to(dtype)
        for m in (1, 2, 5, 9, 16, 17, 32, 33):  # every kernel bucket, two tensor-core passes, the fallback
            x = torch.randn(m, k, generator=g).to(dtype)
            for b in (None, bias):
                _poison_allocator()
                got = ops.lowbit_linear(x.cuda(), qw, None if b is None else b.cuda())
                want = reference.lowbit_linear(x, qw.qweight.cpu(), qw.scale.cpu(), qw.zero.cpu(), bits, group, b)
                assert got.dtype == dtype and got.shape == want.shape
                assert rel_err(got, want) <= MATMUL_TOL[dtype], (n, k, group, m)
    x3 = torch.randn(2, 3, 576, generator=g).to(dtype)
    qw = quantize_weight(torch.randn(64, 576, generator=g), bits, 64, dtype=dtype)
    got = ops.lowbit_linear(x3.cuda(), qw.to("cuda"))
    want = reference.lowbit_linear(x3, qw.qweight, qw.scale, qw.zero, bits, 64, None)
    assert got.shape == (2, 3, 64) and rel_err(got, want) <= MATMUL_TOL[dtype]


@pytest.mark.gpu
def test_gpu_offset_views_and_streams(cuda_backend):
    """Inputs that are views at odd offsets and work on a side stream still give the reference."""
    g = torch.Generator().manual_seed(3)
    x = activations(9, 301, torch.float16, "heavy", seed=3)
    base = torch.empty(x.numel() + 1, dtype=torch.float16, device="cuda")
    xv = base[1:].view(9, 301)
    xv.copy_(x.cuda())
    want = reference.ts_tabq_encode(x, False, 4.0, 3, [2, 4, 8], 0.05, None)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = ops.ts_tabq_encode(xv, False, 4.0, 3, [2, 4, 8], 0.05)
        codes = torch.empty(9, got[7].shape[1] + 1, dtype=torch.uint8, device="cuda")
        codes[:, 1:] = got[7]
        dec = ops.ts_tabq_decode(*got[:3], *got[4:7], codes[:, 1:], 301)
    stream.synchronize()
    assert_encode_equal(got, want)
    assert torch.equal(dec.cpu(), reference.ts_tabq_decode(*want[:3], *want[4:8], 301))
    qw = quantize_weight(torch.randn(48, 256, generator=g), 4, 128, dtype=torch.float16).to("cuda")
    xs = torch.empty(3 * 256 + 1, dtype=torch.float16, device="cuda")[1:].view(3, 256)  # 2-byte offset
    xs.copy_(torch.randn(3, 256, generator=g).half())
    got = ops.lowbit_linear(xs, qw)
    want = reference.lowbit_linear(xs.cpu(), qw.qweight.cpu(), qw.scale.cpu(), qw.zero.cpu(), 4, 128, None)
    assert rel_err(got, want) <= 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("m", (1, 8))  # the CUDA-core and the tensor-core kernel
def test_gpu_gemv_split_k_on_streams_and_graphs(cuda_backend, m):
    """Split-K's tile counters are per stream and reset by the kernel; under graph capture each
    launch splits K with counters of its own, and replays (after other launches on the stream's
    counters) give the same result."""
    g = torch.Generator().manual_seed(5)
    qw = quantize_weight(torch.randn(96, 8192, generator=g), 4, 128, dtype=torch.float16).to("cuda")
    x = torch.randn(m, 8192, generator=g).half()
    want = reference.lowbit_linear(x, qw.qweight.cpu(), qw.scale.cpu(), qw.zero.cpu(), 4, 128, None)
    xc = x.cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    outs = []
    with torch.cuda.stream(side):
        for _ in range(3):
            outs.append(ops.lowbit_linear(xc, qw))
    side.synchronize()
    outs.append(ops.lowbit_linear(xc, qw))
    for got in outs:
        assert rel_err(got, want) <= 1e-3
    from splitkernels._backends import cuda as glue

    assert glue._C.gemv_splits(m, 96, 8192, 4, 128, 1) > 1  # the graph below takes split-K
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = ops.lowbit_linear(xc, qw)
        static2 = ops.lowbit_linear(xc * 2, qw)  # a second launch in the same graph
    for _ in range(2):
        graph.replay()
        ops.lowbit_linear(xc, qw)  # an eager split launch between replays
        torch.cuda.synchronize()
        assert rel_err(static, want) <= 1e-3
        assert rel_err(static2, 2 * want) <= 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_gpu_tensor_core_gemv_at_small_m(cuda_backend, dtype):
    """The tensor-core GEMV with its threshold moved to M = 1 (as bench_gpu_cuda.py does)."""
    from splitkernels._backends import cuda as glue

    g = torch.Generator().manual_seed(6)
    qw = quantize_weight(torch.randn(300, 4096, generator=g), 4, 128, dtype=dtype).to("cuda")
    bias = torch.randn(300, generator=g).to(dtype)
    old = glue._C.gemv_tc_min_m(1)
    glue._GEMV_SPLITS.clear()
    glue._GEMV_FUSED.clear()
    try:
        for m in (1, 2, 3, 4):
            x = torch.randn(m, 4096, generator=g).to(dtype)
            _poison_allocator()
            got = ops.lowbit_linear(x.cuda(), qw, bias.cuda())
            want = reference.lowbit_linear(x, qw.qweight.cpu(), qw.scale.cpu(), qw.zero.cpu(), 4, 128, bias)
            assert rel_err(got, want) <= MATMUL_TOL[dtype], m
    finally:
        glue._C.gemv_tc_min_m(old)
        glue._GEMV_SPLITS.clear()
        glue._GEMV_FUSED.clear()


@pytest.mark.gpu
def test_gpu_gemv_prefetch_variant(cuda_backend):
    """The CUDA-core prefetch variant bench/gpu_gemv_sweep.py times, with split-K (K = 4224: 132
    chunks, a ragged last step) and without (N = 4100: one split fills the card); with the
    tensor-core kernel taking M = 1 too, the variant must leave it alone."""
    from splitkernels._backends import cuda as glue

    g = torch.Generator().manual_seed(60)
    old_min_m, old_variant = glue._C.gemv_tc_min_m(0), glue._C.gemv_variant(glue._C.VARIANT_CC_PREFETCH)
    glue._GEMV_SPLITS.clear()
    glue._GEMV_FUSED.clear()
    try:
        for dtype, n, k in ((torch.float16, 300, 4224), (torch.bfloat16, 4100, 1152)):
            qw = quantize_weight(torch.randn(n, k, generator=g), 4, 128, dtype=dtype).to("cuda")
            bias = torch.randn(n, generator=g).to(dtype)
            for min_m in (1, 33):  # tensor cores from M = 1, then CUDA cores up to M = 16
                glue._C.gemv_tc_min_m(min_m)
                glue._GEMV_SPLITS.clear()
                glue._GEMV_FUSED.clear()
                for m in (1, 3):
                    x = torch.randn(m, k, generator=g).to(dtype)
                    _poison_allocator()
                    got = ops.lowbit_linear(x.cuda(), qw, bias.cuda())
                    want = reference.lowbit_linear(x, qw.qweight.cpu(), qw.scale.cpu(), qw.zero.cpu(), 4, 128, bias)
                    assert rel_err(got, want) <= MATMUL_TOL[dtype], (dtype, n, k, min_m, m)
    finally:
        glue._C.gemv_tc_min_m(old_min_m)
        glue._C.gemv_variant(old_variant)
        glue._GEMV_SPLITS.clear()
        glue._GEMV_FUSED.clear()


BARRIER_MUTANTS = {
    # block_ops.cuh: a thread reads the per-warp partials before every warp has written its slot.
    "all_reduce partials": ("cuda/block_ops.cuh", "    __syncthreads();\n    T r = scratch[0];", "    T r = scratch[0];"),
    "exclusive_count partials": pytest.param(
        ("cuda/block_ops.cuh", "    __syncthreads();\n    int before = 0, all = 0;", "    int before = 0, all = 0;"),
        marks=pytest.mark.slow),  # a second compile of the emulation: half a minute
}


def _encode_matches_reference(lib_path: str, seed: int) -> bool:
    """One emulated encode with a given interleaving seed, compared with the reference."""
    lib = ctypes.CDLL(lib_path)
    lib.emu_set_seed(ctypes.c_uint64(seed))
    x = activations(6, 300, torch.float32, "heavy", seed=5)
    want = reference.ts_tabq_encode(x, False, 4.0, 2, [2, 3, 4, 5, 6, 8], 0.02, None)
    try:
        assert_encode_equal(_emu_encode(lib, x, False, 4.0, 2, [2, 3, 4, 5, 6, 8], 0.02, None), want)
    except AssertionError:
        return False
    return True


def test_emulation_interleavings_agree(emu):
    # The intact kernels give the reference result under every interleaving seed.
    for seed in range(1, 7):
        assert _encode_matches_reference(emu._name, seed), seed


@pytest.mark.parametrize("mutant", list(BARRIER_MUTANTS.values()), ids=list(BARRIER_MUTANTS))
def test_emulation_catches_a_missing_barrier(tmp_path, mutant):
    # The emulation interleaves threads at random between sync points: the kernel source with a
    # needed __syncthreads() deleted must give a wrong result (or crash) for some seed. Each run
    # is a child process, since a broken kernel may write out of bounds.
    path, line, replacement = mutant
    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", csrc)
    text = (csrc / path).read_text()
    assert text.count(line) == 1, "the mutant no longer matches the source; update BARRIER_MUTANTS"
    (csrc / path).write_text(text.replace(line, replacement))
    broken = _build_emulation(csrc, tmp_path / "broken.so")
    script = ("import sys; sys.path.insert(0, {tests!r}); import test_cuda_backend as t; "
              "sys.exit(0 if t._encode_matches_reference(sys.argv[1], int(sys.argv[2])) else 3)")
    for seed in range(1, 7):
        run = subprocess.run([sys.executable, "-c", script.format(tests=str(ROOT / "python_tests")), broken._name,
                              str(seed)], capture_output=True, timeout=300)
        if run.returncode != 0:
            return
    pytest.fail(f"no seed exposed the missing barrier ({mutant})")
