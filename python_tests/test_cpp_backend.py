"""The cpp backend (C++/OpenMP kernels in splitkernels._C) against the pure-PyTorch reference.

Integer outputs (packed bytes, codes, indices, counts, widths, fp16 lo/step bits) and decoded
values must be identical; int8_linear is bit-identical too; lowbit_linear is checked against a
float64 computation with the tolerances documented in splitkernels/_backends/cpp.py.
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from expect import unavailable

import splitkernels
from splitkernels import codec, ops, registry
from splitkernels._backends import cpp
from splitkernels.ops import reference as ref
from splitkernels.quant import QuantizedWeight, pack_weight_codes, quantize_weight, quantize_weight_int8

if not registry.get_backend("cpp").available:
    unavailable(f"cpp backend not built: {registry.get_backend('cpp').unavailable_reason}")

_C = cpp._C
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
POISON = 0xA5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality including the sign of zero (floats compared by their bit patterns)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        view = {2: torch.int16, 4: torch.int32}[a.element_size()]
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


# ---------------------------------------------------------------- selection


def test_cpp_is_the_default_on_cpu():
    assert splitkernels.backends()["cpp"]["available"]
    kernels = registry.get_backend("cpp").kernels
    assert set(kernels) == {"pack_bits", "unpack_bits", "ts_tabq_encode", "ts_tabq_decode", "lowbit_linear",
                            "int8_linear"}
    for op, fn in kernels.items():
        assert registry.resolve(op, torch.device("cpu")) is fn


def test_use_backend_cpp_routes_public_ops():
    codes = torch.randint(0, 8, (4, 21), dtype=torch.uint8, generator=_gen(0))
    with splitkernels.use_backend("cpp"):
        assert registry.resolve("pack_bits", torch.device("cpu")) is cpp.pack_bits
        packed = ops.pack_bits(codes, 3)
    assert torch.equal(packed, ref.pack_bits(codes, 3))


def test_missing_extension_is_reported_not_raised():
    # A fresh interpreter in which importing splitkernels._C fails.
    script = textwrap.dedent(
        """
        import sys
        sys.modules["splitkernels._C"] = None
        import torch, splitkernels
        from splitkernels import _native, ops
        info = splitkernels.backends()["cpp"]
        assert not info["available"] and "splitkernels._C" in info["reason"], info
        codes = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.uint8)
        assert ops.pack_bits(codes, 3).tolist() == [[0xD1, 0x58]]  # falls back to the reference
        try:
            with splitkernels.use_backend("cpp"):
                pass
        except RuntimeError as exc:
            assert _native.BUILD_HINT in str(exc), exc
        else:
            raise AssertionError("use_backend('cpp') must raise without the extension")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_num_threads_reported():
    assert _C.num_threads() >= 1


# ---------------------------------------------------------------- pack / unpack


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 33), (2, 3, 100), (0, 5), (4, 0)])
def test_pack_unpack_match_reference(bits, shape):
    codes = torch.randint(0, 1 << bits, shape, dtype=torch.uint8, generator=_gen(bits))
    packed = cpp.pack_bits(codes, bits)
    assert torch.equal(packed, ref.pack_bits(codes, bits))
    assert torch.equal(cpp.unpack_bits(packed, bits, shape[-1]), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_unpack_reads_only_the_stream_prefix(bits):
    n = 37
    packed = torch.randint(0, 256, (5, ref.packed_nbytes(n, bits) + 6), dtype=torch.uint8, generator=_gen(bits))
    assert torch.equal(cpp.unpack_bits(packed, bits, n), ref.unpack_bits(packed, bits, n))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 5, 8, 13, 64, 203])
def test_word_and_bitwise_paths_write_identical_bytes(bits, n):
    rows = 3
    codes = torch.randint(0, 1 << bits, (rows, n), dtype=torch.uint8, generator=_gen(n * bits))
    nb = ref.packed_nbytes(n, bits)
    outs = []
    for bitwise in (False, True):
        out = torch.full((rows, nb), POISON, dtype=torch.uint8)
        _C.pack_bits(codes.data_ptr(), rows, n, bits, out.data_ptr(), bitwise)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], ref.pack_bits(codes, bits))  # poison fully overwritten, tail bits zero
    decoded = []
    for bitwise in (False, True):
        out = torch.full((rows, n), POISON, dtype=torch.uint8)
        _C.unpack_bits(outs[0].data_ptr(), rows, nb, n, bits, out.data_ptr(), bitwise)
        decoded.append(out)
    assert torch.equal(decoded[0], codes) and torch.equal(decoded[1], codes)


# ---------------------------------------------------------------- codec


def _activations(t: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = _gen(seed)
    x = torch.randn(t, d, generator=g)
    if d > 3:
        x[:, torch.randint(0, d, (2,), generator=g)] *= 12  # heavy channels
    if t > 1:
        x[0] *= 1000  # a massive first token
    return x.to(dtype)


def _check_encode(x, *args, forced=None):
    want = ref.ts_tabq_encode(x, *args, forced)
    got = cpp.ts_tabq_encode(x, *args, forced)
    names = ("bits", "lo", "step", "hi", "cnt", "idx", "val", "codes", "nbytes")
    for name, a, b in zip(names, got, want):
        assert _bits_equal(a, b), f"{name} differs: {a} vs {b}"
    d = x.shape[1]
    dec = cpp.ts_tabq_decode(got[0], got[1], got[2], got[4], got[5], got[6], got[7], d)
    want_dec = ref.ts_tabq_decode(want[0], want[1], want[2], want[4], want[5], want[6], want[7], d)
    assert _bits_equal(dec, want_dec)
    return got


SHAPES = [(1, 1), (1, 7), (5, 13), (16, 100), (9, 256)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_encode_rms_mode(dtype, shape):
    t, d = shape
    x = _activations(t, d, dtype, seed=t * d)
    for capacity in sorted({0, min(3, d), d}):
        _check_encode(x, False, 3.0, capacity, [2, 3, 4, 5, 6, 8], 0.05)
    _check_encode(x, False, 1.5, min(4, d), [1, 2, 4, 8], 0.2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_abs_mode_all_outliers_and_ties(dtype):
    x = _activations(6, 40, dtype, seed=1)
    got = _check_encode(x, True, 0.0, 40, [4], 0.1)  # every nonzero value is an outlier
    assert int(got[4].sum()) == int((x != 0).sum())
    # Values exactly at tau are inliers; equal magnitudes over capacity go to the lower channel.
    ties = torch.tensor([[1.0, -2.0, 2.0, 1.0, -1.0, 2.0, 0.5, -2.0]] * 3, dtype=dtype)
    ties[1, 0] = 3.0
    for capacity in range(0, 9):
        _check_encode(ties, True, 1.0, capacity, [2, 3], 0.3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_constant_and_zero_rows(dtype):
    x = torch.tensor([[0.75] * 20, [0.0] * 20, [-3.0] * 20], dtype=dtype)
    for capacity in (0, 5, 20):
        _check_encode(x, False, 2.0, capacity, [1, 2, 4], 0.1)
        _check_encode(x, True, 0.5, capacity, [1, 2, 4], 0.1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_signed_zero_extremes(dtype):
    x = torch.tensor(
        [[0.0, -0.0, 1.0, 2.0] * 5, [-0.0, 0.0, 3.0, 1.0] * 5, [-0.0] * 20, [-1.0, -0.0, 0.0, -2.0] * 5], dtype=dtype
    )
    got = _check_encode(x, False, 4.0, 0, [2, 4], 0.1)
    assert got[1][:3].view(torch.int16).tolist() == [0, 0, 0]  # lo of the first three rows is +0
    assert got[3][3].view(torch.int32).item() == 0  # hi of the last row is +0


@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_forced_bits(dtype):
    x = _activations(24, 70, dtype, seed=5)
    raw = ref.raw_width(dtype)
    forced = torch.randint(1, 9, (24,), dtype=torch.uint8, generator=_gen(6))
    forced[::5] = raw
    _check_encode(x, False, 3.0, 4, [4], 0.0, forced=forced)
    with pytest.raises(ValueError, match="forced_bits"):
        cpp.ts_tabq_encode(x, False, 3.0, 4, [4], 0.0, torch.full((24,), 9, dtype=torch.uint8))


def test_encode_raw_fallbacks():
    x = _activations(8, 50, torch.float32, seed=7)
    x[2] = x[2] * 1e6  # inliers below -65504: lo does not fit fp16 -> raw
    x[3, 10] = -7e4
    x[4, :] = 1e6  # constant beyond fp16: lo rounds down to 65504; 2 bits overflow step, 4 fit
    got = _check_encode(x, False, 3.0, 0, [2, 4, 8], 0.05)
    assert got[0][2] == 32 and got[0][3] == 32 and got[0][4] == 4
    _check_encode(x, False, 3.0, 2, [], 0.05)  # empty menu: every token raw
    _check_encode(x, False, 3.0, 2, [2, 4], 1e-9)  # error budget too tight: raw


def test_encode_many_random_inputs():
    for seed in range(12):
        g = _gen(100 + seed)
        t = int(torch.randint(1, 20, (1,), generator=g))
        d = int(torch.randint(1, 300, (1,), generator=g))
        dtype = DTYPES[seed % 3]
        x = (torch.randn(t, d, generator=g) * float(torch.rand(1, generator=g) * 10 + 0.01)).to(dtype)
        cap = int(torch.randint(0, d + 1, (1,), generator=g))
        menu = sorted({int(b) for b in torch.randint(1, 9, (3,), generator=g)})
        abs_mode = seed % 4 == 0
        _check_encode(x, abs_mode, 0.5 if abs_mode else 2.5, cap, menu, 0.08)


def test_encode_empty_tokens():
    x = torch.randn(0, 16)
    got = cpp.ts_tabq_encode(x, False, 3.0, 2, [4], 0.1, None)
    assert [tuple(o.shape) for o in got] == [(0,), (0,), (0,), (0,), (0,), (0, 2), (0, 2), (0, 64), (0,)]


def test_encode_overwrites_poisoned_buffers():
    x = _activations(7, 45, torch.float16, seed=9)
    t, d, cap = 7, 45, 5
    outs = [
        torch.full((t,), POISON, dtype=torch.uint8),
        torch.full((t,), 1.5, dtype=torch.float16),
        torch.full((t,), 1.5, dtype=torch.float16),
        torch.full((t,), 1.5, dtype=torch.float32),
        torch.full((t,), -1, dtype=torch.int32),
        torch.full((t, cap), -1, dtype=torch.int32),
        torch.full((t, cap), 1.5, dtype=torch.float16),
        torch.full((t, 2 * d), POISON, dtype=torch.uint8),
        torch.full((t,), -1, dtype=torch.int32),
    ]
    _C.ts_tabq_encode(x.data_ptr(), 1, t, d, False, 2.0, cap, [2, 3, 4], 0.05, 0, *[o.data_ptr() for o in outs])
    want = ref.ts_tabq_encode(x, False, 2.0, cap, [2, 3, 4], 0.05, None)
    for a, b in zip(outs, want):
        assert _bits_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_of_a_parsed_frame(dtype):
    x = _activations(10, 96, dtype, seed=11)
    cfg = codec.CodecConfig(capacity=4)
    with splitkernels.use_backend("reference"):
        want_frame = codec.encode(x, cfg).to_bytes()
    enc = codec.encode(x, cfg)  # default backend: cpp
    assert enc.to_bytes() == want_frame
    parsed = codec.from_bytes(want_frame)
    with splitkernels.use_backend("reference"):
        want = codec.decode(parsed)
    assert _bits_equal(codec.decode(parsed), want)


def test_decode_overwrites_poison_and_rejects_bad_buffers():
    x = _activations(5, 30, torch.float32, seed=12)
    bits, lo, step, _hi, cnt, idx, val, codes, _nb = ref.ts_tabq_encode(x, False, 2.0, 3, [3, 5], 0.05, None)
    out = torch.full((5, 30), float("nan"))
    args = [bits.int(), lo.float(), step.float(), cnt, idx, val]
    _C.ts_tabq_decode(*[a.data_ptr() for a in args], 3, codes.data_ptr(), codes.shape[1], 5, 30, 0, out.data_ptr())
    assert _bits_equal(out, ref.ts_tabq_decode(bits, lo, step, cnt, idx, val, codes, 30))
    bad_idx = idx.clone()
    bad_idx[0, 0] = 30
    with pytest.raises(ValueError, match="idx"):
        cpp.ts_tabq_decode(bits, lo, step, cnt.clamp(min=1), bad_idx, val, codes, 30)
    with pytest.raises(ValueError, match="bits"):
        cpp.ts_tabq_decode(torch.full_like(bits, 16), lo, step, cnt, idx, val, codes, 30)
    with pytest.raises(ValueError, match="bytes per row"):
        cpp.ts_tabq_decode(bits, lo, step, cnt, idx, val, codes[:, :5], 30)


# ---------------------------------------------------------------- low-bit linear


def _rel_err(y: torch.Tensor, want64: torch.Tensor) -> float:
    return float((y.double() - want64).norm() / want64.norm())


def _lowbit_case(n, k, m, bits, group, dtype, bias, seed, lead=()):
    g = _gen(seed)
    w = torch.randn(n, k, generator=g)
    qw = quantize_weight(w, bits, group, dtype=dtype)
    x = torch.randn(*lead, m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, qw, b


def _lowbit_want64(x, qw, b):
    w64 = ref.dequantize_weight(qw.qweight, qw.scale.double(), qw.zero.double(), qw.bits, qw.group_size, qw.in_features)
    y = x.double() @ w64.T
    return y if b is None else y + b.double()


# fp16 / bf16 outputs: their own rounding, at most 2^-11 / 2^-8 of each value (sums in fp32); a
# bf16 output of a few dozen values can exceed 2e-3 in norm (3 bits, groups of 24, M = 1: 2.0006e-3).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2.0**-8}


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group", (32, 128, 3, 384))
@pytest.mark.parametrize("m", (1, 3, 4, 5, 17))
def test_lowbit_linear_fp32(bits, group, m):
    x, qw, b = _lowbit_case(37, 384, m, bits, group, torch.float32, bias=m % 2 == 1, seed=bits * m + group)
    y = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, group, b)
    assert y.dtype == torch.float32 and y.shape == (m, 37)
    assert _rel_err(y, _lowbit_want64(x, qw, b)) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("m", (1, 6))
def test_lowbit_linear_half(dtype, bits, m):
    x, qw, b = _lowbit_case(64, 256, m, bits, 64, dtype, bias=True, seed=bits + m, lead=(2,))
    y = ops.lowbit_linear(x, qw, b)  # public op, default backend
    assert y.dtype == dtype and y.shape == (2, m, 64)
    assert _rel_err(y, _lowbit_want64(x, qw, b)) <= TOL[dtype]
    # The public op promises 1e-3 against the reference op (both round to the same dtype).
    want = ref.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, 64, b)
    assert _rel_err(y, want.double()) <= 1e-3


def _before_guard_page(t: torch.Tensor, keep: list) -> torch.Tensor:
    """A copy of t whose last byte sits just before a page no one may read (mprotect PROT_NONE)."""
    page = mmap.PAGESIZE
    size = t.numel() * t.element_size()
    pages = (size + page - 1) // page + 1
    buf = mmap.mmap(-1, pages * page)
    libc = ctypes.CDLL(None, use_errno=True)
    start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    if libc.mprotect(ctypes.c_void_p(start + (pages - 1) * page), ctypes.c_size_t(page), 0) != 0:
        pytest.fail(f"mprotect failed: errno {ctypes.get_errno()}")
    keep.append(buf)
    out = torch.frombuffer(buf, dtype=torch.uint8, count=size, offset=(pages - 1) * page - size)
    out = out.view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="guard pages through libc mprotect (Linux)")
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("k,group", [(512, 128), (512, 64), (576, 64), (384, 32)])
def test_lowbit_linear_reads_stay_inside_the_weight(each_isa, bits, k, group):
    # The VNNI path loads a 3-bit chunk (48 bytes) as 64 where 64 lie inside the weight: the last
    # row's last chunk, right before a guard page, must take the masked load (a fault otherwise).
    keep: list = []
    for isa in each_isa:
        cpp._C.set_lowbit_isa(isa)
        for dtype in (torch.float32, torch.bfloat16):
            for m in (1, 2, 4):
                x, qw, b = _lowbit_case(5, k, m, bits, group, dtype, bias=False, seed=bits + m + k)
                guarded = [_before_guard_page(t, keep) for t in (qw.qweight, qw.scale, qw.zero)]
                y = cpp.lowbit_linear(x, *guarded, bits, group, None)
                assert _rel_err(y, _lowbit_want64(x, qw, None)) <= TOL[dtype], (isa, dtype, m)


def test_lowbit_linear_scale_dtype_differs_from_x():
    x, qw, b = _lowbit_case(20, 96, 2, 4, 32, torch.float32, bias=True, seed=3)
    xh = x.half()
    y = cpp.lowbit_linear(xh, qw.qweight, qw.scale, qw.zero, 4, 32, b)
    assert y.dtype == torch.float16
    assert _rel_err(y, _lowbit_want64(xh, qw, b)) <= TOL[torch.float16]


def test_lowbit_linear_reads_every_finite_fp16_scale_exactly(each_isa):
    # Every finite fp16 bit pattern (subnormals and -0 included) as a scale, codes 1 and zeros 0:
    # with x one at a single position of group `grp`, y[n] is scale[n, grp] itself, so the kernels'
    # fp16 -> fp32 conversion (branch-free, common/half.h) must match torch's bit for bit.
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    n, groups, group = 496, 128, 32
    scale = every[torch.isfinite(every)].reshape(n, groups)
    codes = torch.ones(n, groups * group, dtype=torch.int32)
    qw = QuantizedWeight(pack_weight_codes(codes, 4), scale, torch.zeros_like(scale), 4, group, groups * group).check()
    for isa in each_isa:
        cpp._C.set_lowbit_isa(isa)
        for m in (1, 3):
            for grp in range(groups):
                x = torch.zeros(m, groups * group)
                x[:, grp * group + 5] = 1.0
                y = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 4, group, None)
                assert torch.equal(y, scale[:, grp].float().expand(m, n)), (isa, m, grp)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("m", (1, 3, 300))
def test_lowbit_linear_op_keeps_fp32_scales_for_half_activations(dtype, m):
    # The public op with fp32 scales and zero points and fp16/bf16 activations near 3: the kernels
    # read the scales as they are. Rounded to bf16 first, each group's zero point moved all of its
    # weights alike, and the output 5e-2 from the reference. From 192 rows the kernels may hold W
    # itself dequantised to bf16 (the AMX scaled panels from 192 rows in groups of 128, the vector
    # ones and torch's bf16 matmul from 256): then W's own rounding, as a dense bf16 F.linear's
    # (4.5e-3 here), is allowed too.
    x, qw, b = _lowbit_case(40, 512, m, 4, 128, torch.float32, bias=True, seed=m)
    x = (x + 3).to(dtype)
    want = ref.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 4, 128, b)
    want64 = _lowbit_want64(x, qw, b)
    assert qw.scale.dtype == torch.float32 and want.dtype == dtype
    allowed = _rel_err(want, want64)
    if m >= 192:
        allowed = max(allowed, _rel_err(_lowbit_want64_bf16_weight(x, qw, b).to(dtype), want64))
    assert _rel_err(ops.lowbit_linear(x, qw, b), want.double()) <= 2 * allowed + 1e-3


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_lowbit_fused_and_buffered_paths_agree(bits):
    # M <= 6 decodes codes straight into the FMAs; M > 6 dequantises rows into a buffer.
    x, qw, _ = _lowbit_case(45, 512, 9, bits, 128, torch.float32, bias=False, seed=bits)
    big = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, 128, None)
    rows = torch.cat([cpp.lowbit_linear(x[i : i + 1], qw.qweight, qw.scale, qw.zero, bits, 128, None) for i in range(9)])
    assert float((big - rows).norm() / rows.norm()) <= 1e-6


def test_lowbit_linear_empty_and_errors():
    x, qw, _ = _lowbit_case(8, 64, 1, 4, 32, torch.float32, bias=False, seed=0)
    y = cpp.lowbit_linear(x[:0], qw.qweight, qw.scale, qw.zero, 4, 32, None)
    assert y.shape == (0, 8)
    # Bad layouts are stopped by the op layer before any kernel runs.
    with splitkernels.use_backend("cpp"), pytest.raises(ValueError, match="scale"):
        ops.lowbit_linear(x, QuantizedWeight(qw.qweight, qw.scale[:, :1], qw.zero[:, :1], 4, 32, 64))
    bad_group = QuantizedWeight(qw.qweight, qw.scale.repeat(1, 32)[:, :5], qw.zero.repeat(1, 32)[:, :5], 4, 13, 64)
    with splitkernels.use_backend("cpp"), pytest.raises(ValueError, match="group_size"):
        ops.lowbit_linear(x, bad_group)


# The bf16-activation kernels (AVX-512 BF16): every group width they take (4..32 bytes, one or
# two 64-byte chunks), rows whose codes end inside a 64-byte chunk, M on both sides of the dot /
# panel switch, N with short 8-, 4-, 2-row and 32-row tails.
_BF16_LAYOUTS = [
    (2, 16, 208), (2, 32, 288), (2, 64, 576), (2, 128, 384), (2, 256, 768),
    (4, 8, 296), (4, 16, 176), (4, 32, 224), (4, 64, 576), (4, 128, 384), (4, 256, 512),
    (8, 4, 84), (8, 8, 72), (8, 16, 80), (8, 32, 224), (8, 64, 576), (8, 128, 384),
]


def _needs_bf16_kernels() -> None:
    if "avx512_bf16" not in cpp._C.lowbit_isas():
        pytest.skip("this CPU has no AVX-512 BF16: the bf16 kernels never run here")


def _best_vector_bf16_isa() -> str:
    """The best AVX-512 BF16 instruction set without AMX tiles (VBMI adds the 3-bit kernels)."""
    return "avx512_bf16_vbmi" if "avx512_bf16_vbmi" in cpp._C.lowbit_isas() else "avx512_bf16"


@pytest.fixture
def vector_bf16_isa():
    """The vector bf16 kernels (the best AVX-512 BF16 set without AMX tiles) for the test body."""
    default = cpp._C.lowbit_isa()
    if "avx512_bf16" in cpp._C.lowbit_isas():
        cpp._C.set_lowbit_isa(_best_vector_bf16_isa())
    yield
    cpp._C.set_lowbit_isa(default)


def _bf16_kernel_on_poisoned_output(
    x: torch.Tensor, qw, b: torch.Tensor | None, bits: int, group: int, finite: bool = True
) -> torch.Tensor:
    """The extension's bf16 ``lowbit_linear`` of ``x [M, K]`` straight into a poisoned output,
    which it must overwrite completely: NaN-filled and asserted finite after, or (``finite``
    false, for non-finite x) filled with 7 and asserted changed everywhere."""
    (m, k), n = x.shape, qw.qweight.shape[0]
    y = torch.full((m, n), float("nan") if finite else 7.0, dtype=torch.bfloat16)
    b32 = None if b is None else b.float()
    cpp._C.lowbit_linear(
        x.data_ptr(), 2, m, k, qw.qweight.data_ptr(), n, qw.qweight.shape[1], qw.scale.data_ptr(), qw.zero.data_ptr(),
        cpp.DTYPE_CODE[qw.scale.dtype], bits, group, 0 if b32 is None else b32.data_ptr(), y.data_ptr(),
    )
    assert torch.isfinite(y).all() if finite else not (y == 7).any()
    return y


@pytest.mark.parametrize("bits,group,k", _BF16_LAYOUTS)
@pytest.mark.parametrize("m", (1, 2, 3, 4, 5, 9))
def test_lowbit_bf16_kernels_every_layout(bits, group, k, m):
    _needs_bf16_kernels()
    assert cpp._C.lowbit_bf16_kernel(2, bits, group)
    n = 45
    x, qw, b = _lowbit_case(n, k, m, bits, group, torch.bfloat16, bias=m % 2 == 1, seed=bits * 1000 + group + m)
    want64 = _lowbit_want64(x, qw, b)
    y = _bf16_kernel_on_poisoned_output(x, qw, b, bits, group)
    assert _rel_err(y, want64) <= TOL[torch.bfloat16]
    # The public op takes the same path.
    assert _rel_err(ops.lowbit_linear(x, qw, b), want64) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("bits,group", [(2, 256), (4, 128), (8, 64), (8, 128)])
@pytest.mark.parametrize("m", (2, 3, 4))
def test_lowbit_bf16_kernels_k_slices(bits, group, m):
    # Few rows with a long K: the dot form reads K in slices of whole groups that keep x in L1
    # (more than 8 KiB of activations), the last slice a short one (K = 2304: 9, 18 or 36
    # groups), the zero-point term once, and writes each output after the last slice.
    _needs_bf16_kernels()
    n, k = 45, 2304
    x, qw, b = _lowbit_case(n, k, m, bits, group, torch.bfloat16, bias=m != 3, seed=bits * 7 + group + m)
    x = x + 3  # a code offset that does not cancel within one slice
    y = _bf16_kernel_on_poisoned_output(x, qw, b, bits, group)
    assert _rel_err(y, _lowbit_want64(x, qw, b)) <= TOL[torch.bfloat16]
    # Row by row (M = 1 never slices) agrees far inside the tolerance.
    rows = torch.cat([cpp.lowbit_linear(x[i : i + 1], qw.qweight, qw.scale, qw.zero, bits, group, b) for i in range(m)])
    assert _rel_err(y, rows.double()) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("bits,m,n", [(8, 3, 600), (8, 2, 600), (4, 4, 1100)])
def test_lowbit_bf16_k_slices_over_row_spans(bits, m, n):
    # One thread takes N / 8 rows at a time; where those hold more than 1 MiB of a weight read in K
    # slices, they go span by span (kSliceSpanBytes): the bf16 dot form (M = 3-4) and the VNNI
    # path's long 8-bit rows (M = 2), here in spans of 64 (16 KiB rows) or 128 (8 KiB) and a short
    # last one. A row's sums do not depend on the span it falls in: a call on some rows alone
    # gives the same bits.
    _needs_bf16_kernels()
    k, group = 16384, 128
    x, qw, b = _lowbit_case(n, k, m, bits, group, torch.bfloat16, bias=True, seed=bits + n + m)
    with _thread_settings():
        cpp._C.set_num_threads(1)
        y = _bf16_kernel_on_poisoned_output(x, qw, b, bits, group)
        parts = {(a, z): cpp.lowbit_linear(x, qw.qweight[a:z], qw.scale[a:z], qw.zero[a:z], bits, group, b[a:z])
                 for a, z in ((0, 64), (n // 2, n), (n - 44, n))}
    assert _rel_err(y, _lowbit_want64(x, qw, b)) <= TOL[torch.bfloat16]
    for (a, z), part in parts.items():
        assert torch.equal(part, y[:, a:z]), (a, z)


@pytest.mark.parametrize("scale_dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("bits,group,k", [(4, 32, 224), (8, 128, 384), (2, 64, 576)])
@pytest.mark.parametrize("m", (1, 6))
def test_lowbit_bf16_kernels_scale_dtypes_and_offset_activations(scale_dtype, bits, group, k, m):
    # Scales in another dtype than x are read as they are; activations far from zero make the
    # 2/4-bit decode's code offset (128 + q, folded into the zero point) cancel in large sums.
    _needs_bf16_kernels()
    g = _gen(bits + group + m)
    qw = quantize_weight(torch.randn(37, k, generator=g), bits, group, dtype=scale_dtype)
    x = (torch.randn(m, k, generator=g) + 30).bfloat16()
    y = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, group, None)
    assert y.dtype == torch.bfloat16
    assert _rel_err(y, _lowbit_want64(x, qw, None)) <= TOL[torch.bfloat16]


def test_lowbit_linear_no_rows_writes_nothing():
    # M = 0 or N = 0 straight into the extension (the Python glue never sends them): no kernel runs.
    x, qw, _ = _lowbit_case(45, 576, 1, 4, 64, torch.bfloat16, bias=False, seed=5)
    y = torch.full((1, 45), 7.0, dtype=torch.bfloat16)
    for m, n in ((0, 45), (1, 0)):
        cpp._C.lowbit_linear(x.data_ptr(), 2, m, 576, qw.qweight.data_ptr(), n, qw.qweight.shape[1],
                             qw.scale.data_ptr(), qw.zero.data_ptr(), 2, 4, 64, 0, y.data_ptr())
    assert bool((y == 7).all())


def test_lowbit_bf16_kernel_choice(each_isa):
    _needs_bf16_kernels()
    assert cpp._C.lowbit_bf16_kernel(2, 4, 128) and cpp._C.lowbit_bf16_kernel(2, 2, 16)
    assert not cpp._C.lowbit_bf16_kernel(0, 4, 128)  # fp32 activations
    assert not cpp._C.lowbit_bf16_kernel(2, 4, 96)  # 48-byte groups: neither divide nor fill 64 bytes
    assert not cpp._C.lowbit_bf16_kernel(2, 8, 2)  # 2-byte groups: part of a four-byte lane
    # 3 bits: only the build with VBMI decodes them, in chunks of 128 codes (runs of 16 codes); the
    # AMX set keeps the best bf16 kernels of its CPU.
    vbmi = "avx512_bf16_vbmi" in each_isa
    for isa in each_isa:
        cpp._C.set_lowbit_isa(isa)
        assert cpp._C.lowbit_bf16_kernel(2, 3, 128) == (isa == "avx512_bf16_vbmi" or (isa == "avx512_amx" and vbmi)), isa
    if "avx512_bf16_vbmi" in each_isa:
        for group in (16, 32, 64, 128, 256, 384):
            assert cpp._C.lowbit_bf16_kernel(2, 3, group), group
        for group in (8, 48, 96, 160, 3):  # part of a 16-code run, or neither divide nor fill a chunk
            assert not cpp._C.lowbit_bf16_kernel(2, 3, group), group
        assert not cpp._C.lowbit_bf16_kernel(0, 3, 128)  # fp32 activations


def _assert_one_hot_decode_exact(bits: int, group: int, k: int, m: int, n: int) -> None:
    """Scale 1, zero 0 and one-hot bf16 activation rows through the bf16 kernel: every output must
    be one code exactly, for every column of K, m columns per call. Row 0 holds the largest code
    (all bits set: a decode window that reaches into the next code shows)."""
    g = _gen(k + group + m)
    top = (1 << bits) - 1
    codes = torch.randint(0, top + 1, (n, k), dtype=torch.uint8, generator=g)
    codes[0] = top
    qw = QuantizedWeight(pack_weight_codes(codes, bits), torch.ones(n, k // group, dtype=torch.bfloat16),
                         torch.zeros(n, k // group, dtype=torch.bfloat16), bits, group, k)
    for start in range(0, k, m):
        cols = torch.arange(start, min(k, start + m))
        x = torch.zeros(len(cols), k, dtype=torch.bfloat16)
        x[torch.arange(len(cols)), cols] = 1
        y = _bf16_kernel_on_poisoned_output(x, qw, None, bits, group)
        assert torch.equal(y.float(), codes[:, cols].T.float()), (start, m)


@pytest.mark.parametrize("group,k", [(4, 84), (16, 80), (64, 576), (128, 384)])
@pytest.mark.parametrize("m", (1, 4, 5, 16, 17))
def test_lowbit_bf16_w8_decode_is_exact(group, k, m):
    # Scale 1, zero 0 and one-hot activation rows: every output is one 8-bit code, exactly (codes
    # below 256 are exact in bf16), so a misplaced code in the dot form's natural order or in the
    # panel's register transposes (M >= 5: 16 rows at a time, N = 50 ends inside the second
    # 32-row block's second half) cannot hide in a tolerance; K = 84 and 80 end inside a chunk.
    _needs_bf16_kernels()
    _assert_one_hot_decode_exact(8, group, k, m, n=50)


@pytest.mark.parametrize("bits,group,k", [(4, 128, 384), (4, 16, 208), (4, 64, 192), (2, 256, 512), (2, 32, 288)])
@pytest.mark.parametrize("m", (1, 4, 5, 16))
def test_lowbit_bf16_w2_w4_decode_is_exact(bits, group, k, m):
    # One-hot activation rows pin the activation order of 2- and 4-bit codes exactly in both
    # forms: whole chunks go through the in-register rearrangement, a partial last chunk (K = 208,
    # 192, 288) through the scalar one, and a misplaced value shows as a wrong code.
    _needs_bf16_kernels()
    _assert_one_hot_decode_exact(bits, group, k, m, n=40)


@pytest.mark.parametrize("bits,group,k", [(8, 128, 384), (8, 64, 576), (8, 8, 72)])
@pytest.mark.parametrize("m", (16, 17, 33))
def test_lowbit_bf16_panel_many_rows(bits, group, k, m):
    # The panel form over several MR-row tiles (16 = 6 + 6 + 4, 17, 33), N with a short second
    # 32-row block, bias, into a poisoned output.
    _needs_bf16_kernels()
    x, qw, b = _lowbit_case(50, k, m, bits, group, torch.bfloat16, bias=True, seed=bits + group + k + m)
    y = _bf16_kernel_on_poisoned_output(x, qw, b, bits, group)
    assert _rel_err(y, _lowbit_want64(x, qw, b)) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("bits,group", [(2, 4096), (3, 2048), (4, 4096), (2, 1024)])
@pytest.mark.parametrize("m", (5, 17))
def test_lowbit_bf16_panel_large_groups_far_from_zero(vector_bf16_isa, bits, group, m):
    # Groups of 1024 codes and more (one per row: per-channel) against bf16 rows of 3 + randn:
    # the panel's sums carry the code offset (128 + q), which the zero term cancels, so one fp32
    # chain over the whole group rounded at that magnitude (W2 1.1e-2 from float64, the output's
    # own rounding 1.6e-3); in blocks of 512 codes (kFoldPairs) they stay at the rounding.
    k = 4096
    g = _gen(bits + group + m)
    qw = quantize_weight(torch.randn(24, k, generator=g), bits, group, dtype=torch.bfloat16)
    x = (torch.randn(m, k, generator=g) + 3).bfloat16()
    want64 = _lowbit_want64(x, qw, None)
    y = _bf16_kernel_on_poisoned_output(x, qw, None, bits, group)
    assert _rel_err(y, want64) <= _vnni_tolerance(want64)


# Rows longer than a wide panel's K slice (2048 codes in whole groups and chunks): slices of
# 4 x 2048 + 256 codes, 4 x 1920 + 768 (groups of 384), 2 x 2048 + 64 (a partial last chunk), and
# rows of one slice.
# One thread takes N = 600 in chunks of 128 rows (two 64-row blocks) and a last one of 88 (a
# 64-row block and a 32-row one holding 24); M = 7 and 33 are tiles of 4 and 3 or 1 rows.
_PANEL_SLICE_LAYOUTS = [
    (4, 128, 8448), (2, 64, 8448), (8, 128, 8448), (3, 384, 8448), (4, 64, 4160), (4, 128, 384), (8, 64, 576)
]


@pytest.mark.parametrize("bits,group,k", _PANEL_SLICE_LAYOUTS)
def test_lowbit_bf16_panel_k_slices(fp32_precision, bits, group, k):
    if bits == 3:
        _needs_w3_kernels()
    else:
        _needs_bf16_kernels()
    with _thread_settings():
        cpp._C.set_num_threads(1)
        _assert_one_hot_decode_exact(bits, group, k, 33, n=600)
        x, qw, b = _lowbit_case(600, k, 7, bits, group, torch.bfloat16, bias=True, seed=bits + group + k)
        y = _bf16_kernel_on_poisoned_output(x, qw, b, bits, group)
        # fp32 rows under "medium" take the same blocks with an fp32 output; x holds bf16 values,
        # so only the summation differs from the exact product (2-bit sums: ~1.5e-5, the code offset).
        fp32_precision("medium")
        y32 = cpp.lowbit_linear(x.float(), qw.qweight, qw.scale, qw.zero, bits, group, b.float())
    want64 = _lowbit_want64(x, qw, b)
    assert _rel_err(y, want64) <= TOL[torch.bfloat16]
    assert y32.dtype == torch.float32 and _rel_err(y32, want64) <= 3e-5


def _lowbit_want64_bf16_weight(x, qw, b):
    """x @ W^T + b in float64 with W dequantised and rounded to bf16 (a dense bf16 F.linear's weight)."""
    w = ref.dequantize_weight(qw.qweight, qw.scale.float(), qw.zero.float(), qw.bits, qw.group_size, qw.in_features)
    y = x.double() @ w.bfloat16().double().T
    return y if b is None else y + b.double()


# From 256 rows (kBf16ScaledPanelMinRows) the panels hold W dequantised to bf16: the result is
# x @ bf16(W)^T with fp32 sums. Groups of 32 (narrow blocks below 256 rows), 64, 128 and 384, every
# code width, K in one slice or several with a partial last chunk, one thread on N = 150 (two 64-row
# blocks and a 22-row tail, which stays exact) and two on N = 512; 255 rows stay on the exact codes.
@pytest.mark.parametrize("bits,group,k", [(4, 32, 576), (2, 64, 4160), (3, 128, 384), (8, 384, 2304), (4, 128, 8448)])
@pytest.mark.parametrize("threads,n", [(1, 150), (2, 512)])
def test_lowbit_bf16_scaled_panels(fp32_precision, vector_bf16_isa, bits, group, k, threads, n):
    if bits == 3:
        _needs_w3_kernels()
    else:
        _needs_bf16_kernels()
    scaled_rows = 256
    with _thread_settings():
        cpp._C.set_num_threads(threads)
        x, qw, b = _lowbit_case(n, k, scaled_rows + 1, bits, group, torch.bfloat16, bias=True, seed=7 * bits + group + k)
        y = _bf16_kernel_on_poisoned_output(x, qw, b, bits, group)
        below = _bf16_kernel_on_poisoned_output(x[:-2], qw, b, bits, group)
        fp32_precision("medium")
        y32 = cpp.lowbit_linear(x.float(), qw.qweight, qw.scale, qw.zero, bits, group, b.float())
    want16 = _lowbit_want64_bf16_weight(x, qw, b)
    want64 = _lowbit_want64(x, qw, b)
    # Each column is one block's: scaled (x @ bf16(W)) or, in a block of 32 rows or fewer, the exact
    # codes. One thread has blocks of 64, 64 and 22 rows; two split N = 512 in chunks first.
    col_err = lambda y_, w_: (y_.double() - w_).norm(dim=0) / w_.norm(dim=0)
    on16, on64 = col_err(y32, want16) <= 3e-5, col_err(y32, want64) <= 3e-5
    assert bool((on16 | on64).all()) and int(on16.sum()) >= (128 if threads == 1 else 256)
    if threads == 1:
        assert bool(on16[:128].all()) and bool(on64[128:].all())
    scaled = on16 & ~on64
    assert _rel_err(y[:, scaled], want16[:, scaled]) <= _rel_err(want16[:, scaled].bfloat16(), want16[:, scaled]) + 2e-4
    assert _rel_err(y, want64) <= TOL[torch.bfloat16]
    # One row fewer than the switch: the exact codes throughout, within the fp32 output's own rounding.
    assert _rel_err(below, want64[:-2]) <= _rel_err(want64[:-2].bfloat16(), want64[:-2]) + 1e-4


# The 3-bit bf16 kernels (AVX-512 BF16 + VBMI): chunks of 128 codes in 48 bytes, groups of 16, 32
# or 64 codes (several per chunk) or whole chunks; rows ending inside a chunk (K = 208, 288, 576,
# 64), M on both sides of the dot / panel switch, N with short row tails, rows of 1 KiB or more
# (K = 3072: read one or two at a time).
_W3_LAYOUTS = [(16, 208), (32, 288), (64, 576), (64, 64), (128, 384), (256, 768), (384, 1152), (128, 3072)]


def _needs_w3_kernels() -> None:
    if "avx512_bf16_vbmi" not in cpp._C.lowbit_isas():
        pytest.skip("this CPU lacks AVX-512 BF16 or VBMI: the 3-bit bf16 kernels never run here")


@pytest.mark.parametrize("group,k", _W3_LAYOUTS)
@pytest.mark.parametrize("m", (1, 2, 3, 4, 5, 9, 19))
def test_lowbit_bf16_w3_every_layout(group, k, m):
    _needs_w3_kernels()
    assert cpp._C.lowbit_bf16_kernel(2, 3, group)
    n = 45
    x, qw, b = _lowbit_case(n, k, m, 3, group, torch.bfloat16, bias=m % 2 == 1, seed=3000 + group + k + m)
    want64 = _lowbit_want64(x, qw, b)
    rounding = _rel_err(want64.bfloat16(), want64)  # a bf16 output's own error (near 2e-3 for some rows)
    y = _bf16_kernel_on_poisoned_output(x, qw, b, 3, group)
    assert _rel_err(y, want64) <= rounding + 1e-3
    # Against the reference op: both outputs are rounded to bf16.
    want = ref.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 3, group, b)
    assert _rel_err(y, want.double()) <= 2 * rounding + 1e-3
    # The public op takes the same path.
    assert torch.equal(ops.lowbit_linear(x, qw, b), y)


@pytest.mark.parametrize("group,k", [(16, 208), (64, 576), (128, 384)])
@pytest.mark.parametrize("m", (1, 3, 4, 7))
def test_lowbit_bf16_w3_decode_is_exact(group, k, m):
    # Scale 1, zero 0 and one-hot activation rows: every output is one code, exactly (the code
    # offset 128 cancels exactly in fp32), so a misplaced bit or lane cannot hide in a tolerance.
    _needs_w3_kernels()
    _assert_one_hot_decode_exact(3, group, k, m, n=37)


def test_lowbit_bf16_w3_k_slices_and_offset_activations():
    # Few rows with a long K: the dot form reads 3-bit rows in slices of whole groups where x
    # outgrows 32 KiB (36 groups of 128: at M = 4, 36 KiB, slices of 32 groups and 4); activations
    # far from zero make the code offset (128 + q, folded into the zero point) cancel in large
    # sums; fp16 scales.
    _needs_w3_kernels()
    n, k, group = 45, 4608, 128
    g = _gen(77)
    qw = quantize_weight(torch.randn(n, k, generator=g), 3, group, dtype=torch.float16)
    b = torch.randn(n, generator=g).bfloat16()
    for m in (1, 2, 4, 6):
        x = (torch.randn(m, k, generator=g) + 30).bfloat16()
        y = _bf16_kernel_on_poisoned_output(x, qw, b, 3, group)
        assert _rel_err(y, _lowbit_want64(x, qw, b)) <= TOL[torch.bfloat16], m
    rows = torch.cat([cpp.lowbit_linear(x[i : i + 1], qw.qweight, qw.scale, qw.zero, 3, group, b) for i in range(6)])
    assert _rel_err(y, rows.double()) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("group,k", [(8, 96), (48, 192), (96, 384), (160, 320)])
def test_lowbit_bf16_w3_declined_groups_fall_back(group, k):
    # Groups the 3-bit bf16 kernels decline run the fp32 kernels, at every M, still correct.
    _needs_w3_kernels()
    assert not cpp._C.lowbit_bf16_kernel(2, 3, group)
    for m in (1, 6):
        x, qw, b = _lowbit_case(29, k, m, 3, group, torch.bfloat16, bias=True, seed=group + m)
        want64 = _lowbit_want64(x, qw, b)
        assert _rel_err(ops.lowbit_linear(x, qw, b), want64) <= _vnni_tolerance(want64)


@pytest.mark.parametrize("bits", (3, 8))
@pytest.mark.parametrize("m", (1, 6, 17))
def test_lowbit_bf16_non_finite_activations(bits, m):
    # NaN or infinity in x: as the 2/4-bit kernels, vdpbf16ps carries it through, and s * sum(q x)
    # + z * sum(x) makes every output of the rows holding it non-finite (as the reference); for
    # 8 bits at M >= 5 through the panel form (at M = 1 the VNNI path falls back to these kernels).
    _needs_w3_kernels() if bits == 3 else _needs_bf16_kernels()
    g = _gen(12 + m + bits)
    qw = quantize_weight(torch.randn(32, 576, generator=g), bits, 64, dtype=torch.bfloat16)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(m, 576, generator=g).bfloat16()
        x[m - 1, 200] = bad
        y = torch.full((m, 32), float("nan"), dtype=torch.bfloat16)  # poisons every output overwrites:
        y[m - 1] = 7  # NaN for the finite rows, 7 for the row holding `bad`
        cpp._C.lowbit_linear(x.data_ptr(), 2, m, 576, qw.qweight.data_ptr(), 32, qw.qweight.shape[1],
                             qw.scale.data_ptr(), qw.zero.data_ptr(), 2, bits, 64, 0, y.data_ptr())
        assert torch.isfinite(y[: m - 1]).all() and not (y[m - 1] == 7).any()
        assert not torch.isfinite(y[m - 1]).any()
        assert not torch.isfinite(ref.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, 64, None)[m - 1]).any()


# The VNNI path (AVX-512 VNNI, M = 1-2): the activation row as three signed bytes of a per-group
# 22-bit fixed point against the codes as packed. Rows four at a time (tails of 1..3), groups of
# one to four 64-byte chunks, or of a half, a quarter, ... of one (their sums side by side in a
# chunk's lanes), rows that end in part of a chunk.
# 8-bit codes: groups of 32 and 16 (K = 96 ends in half a chunk, 1936 in a quarter), K = 4096; rows
# of 8 KiB and more read K slice by slice (kVnniSliceRowBytes; groups of whole chunks): 129 groups
# of 64 in slices of 85, 42 or 64 (one row, two rows, one row of four digits), 36 groups of 256 in
# slices of 21, 10 or 16.
_W8_VNNI_LAYOUTS = [(45, 64, 576), (45, 128, 384), (7, 192, 576), (46, 256, 1792), (33, 128, 1920), (3, 64, 64),
                    (45, 32, 576), (5, 32, 96), (9, 16, 1936), (6, 128, 4096), (5, 64, 896), (7, 64, 8256),
                    (5, 256, 9216), (6, 32, 8192)]
# 4-bit codes: K and groups multiples of 128 (whole 64-byte chunks of nibbles), or groups of 64, 32
# or 16 (K = 576 and 64 end in half a chunk, 1568 in a quarter, 1040 in an eighth).
_W4_VNNI_LAYOUTS = [(45, 128, 384), (46, 256, 1792), (33, 128, 1920), (3, 128, 128), (7, 384, 768), (45, 64, 576),
                    (3, 64, 64), (33, 64, 640), (46, 64, 1984), (9, 128, 2304), (45, 32, 576), (7, 32, 1568),
                    (33, 16, 1040)]
# 2-bit codes: K and groups multiples of 256 (whole chunks of four fields), or groups of 128, 64,
# 32 or 16 (K = 640 and 128 end in half a chunk, 576 in a quarter, 1984 in three quarters, 608 in
# three eighths; 19 groups of 32 span two blocks of zero terms); bf16 rows of 2- and 4-bit codes
# at any K.
_W2_VNNI_LAYOUTS = [(45, 256, 512), (46, 512, 1536), (7, 768, 1536), (45, 128, 384), (3, 128, 128), (33, 128, 640),
                    (46, 128, 1920), (9, 128, 2176), (45, 64, 576), (7, 64, 1984), (33, 32, 608), (3, 16, 48),
                    (46, 32, 4096), (5, 256, 768)]
# 3-bit codes (with VBMI): groups of whole 128-code chunks (48 bytes, two planes of 64 codes) or of
# 64, 32 and 16 codes (K = 576 ends in half a chunk, 608 in a quarter, 1936 in an eighth; K = 32 is
# a quarter), K = 4096 for bf16 rows.
_W3_VNNI_LAYOUTS = [(45, 64, 576), (7, 128, 1536), (46, 256, 1792), (33, 32, 608), (9, 16, 1936), (3, 32, 32),
                    (5, 64, 4096), (5, 128, 896)]
_VNNI_LAYOUTS = [(8, *c) for c in _W8_VNNI_LAYOUTS] + [(4, *c) for c in _W4_VNNI_LAYOUTS] + [
    (2, *c) for c in _W2_VNNI_LAYOUTS] + [(3, *c) for c in _W3_VNNI_LAYOUTS]
# Groups of 2048 codes or more (one a row among them), which the kernels take as equal parts below
# 2048 with the group's scale and zero: 4096 as 4 x 1024, 8192 of 4-bit codes as 8 x 1024, 11008 of
# 2-bit codes as 43 chunks of 256, 11008 of 8-bit codes as 43 x 256, 2048 as 2 x 1024.
_LONG_GROUP_VNNI_LAYOUTS = [(8, 5, 4096, 4096), (4, 6, 8192, 8192), (2, 3, 11008, 11008), (3, 4, 4096, 8192),
                            (8, 7, 2048, 6144), (8, 3, 11008, 11008)]


def _cpu_has_vbmi() -> bool:
    """Whether the CPU has AVX-512 VBMI, from /proc/cpuinfo (the tests' own look at cpuid)."""
    with open("/proc/cpuinfo") as f:
        return "avx512vbmi" in f.read().split()


def _best_isa_without_amx() -> str:
    """The best instruction set this CPU supports short of AMX tiles (which take fp32 rows from 3)."""
    return [isa for isa in cpp._C.lowbit_isas() if isa != "avx512_amx"][-1]


def _needs_vnni(bits: int = 8) -> None:
    if "avx512_vnni" not in cpp._C.lowbit_isas():
        pytest.skip("this CPU has no AVX-512 VNNI: the VNNI path never runs here")
    if bits == 3 and not _cpu_has_vbmi():
        pytest.skip("this CPU has no AVX-512 VBMI: the VNNI path takes no 3-bit codes here")


def test_lowbit_vnni_choice():
    _needs_vnni()
    assert cpp._C.lowbit_vnni(2, 8, 128, 1, 1536) and cpp._C.lowbit_vnni(2, 8, 192, 1, 576)
    assert cpp._C.lowbit_vnni(2, 8, 128, 2, 1536)
    assert not cpp._C.lowbit_vnni(2, 8, 128, 3, 1536)  # bf16 rows from M = 3: the AMX digits or the bf16 kernels
    # fp32 rows up to M = 12 (K >= 768: 14, K >= 1024: 20, 3-bit codes 18) where no AMX tiles take
    # them (else from M = 3 the tiles or the FMA kernels)
    no_amx = "avx512_amx" not in cpp._C.lowbit_isas()
    assert cpp._C.lowbit_vnni(0, 8, 128, 3, 1536) == no_amx and cpp._C.lowbit_vnni(0, 4, 64, 12, 576) == no_amx
    assert not cpp._C.lowbit_vnni(0, 4, 64, 13, 576) and not cpp._C.lowbit_vnni(0, 4, 64, 15, 960)
    assert cpp._C.lowbit_vnni(0, 4, 64, 14, 960) == no_amx and cpp._C.lowbit_vnni(0, 8, 128, 14, 768) == no_amx
    assert cpp._C.lowbit_vnni(0, 4, 64, 20, 1024) == no_amx and not cpp._C.lowbit_vnni(0, 4, 64, 21, 1024)
    if "avx512_bf16_vbmi" in cpp._C.lowbit_isas():  # 3-bit codes
        assert cpp._C.lowbit_vnni(0, 3, 128, 18, 1024) == no_amx and not cpp._C.lowbit_vnni(0, 3, 128, 19, 1024)
    assert cpp._C.lowbit_vnni(2, 8, 128, 1, 4096) and cpp._C.lowbit_vnni(2, 8, 64, 2, 11008)  # at any K
    assert cpp._C.lowbit_vnni(0, 8, 128, 1, 1536) and cpp._C.lowbit_vnni(0, 4, 64, 2, 576)  # fp32 rows too,
    assert cpp._C.lowbit_vnni(0, 4, 128, 1, 4096) and cpp._C.lowbit_vnni(0, 8, 1024, 2, 8192)  # at any K
    assert cpp._C.lowbit_vnni(0, 8, 4096, 1, 4096) and cpp._C.lowbit_vnni(2, 4, 11008, 2, 11008)  # any group
    assert cpp._C.lowbit_vnni(1, 8, 128, 1, 1536)  # fp16 rows: as fp32 rows (converted)
    assert cpp._C.lowbit_vnni(1, 4, 64, 12, 576) == no_amx and not cpp._C.lowbit_vnni(1, 4, 64, 13, 576)
    assert cpp._C.lowbit_vnni(2, 4, 128, 1, 1536) and cpp._C.lowbit_vnni(2, 4, 256, 2, 1792)
    assert cpp._C.lowbit_vnni(2, 4, 64, 1, 576)  # 4-bit codes in groups of half a chunk
    assert cpp._C.lowbit_vnni(2, 4, 32, 1, 1536) and cpp._C.lowbit_vnni(2, 4, 16, 2, 1536)  # or less
    assert not cpp._C.lowbit_vnni(2, 4, 8, 1, 1536)  # down to 16 codes
    assert cpp._C.lowbit_vnni(2, 4, 128, 1, 4096)  # of 4-bit codes at any K
    assert cpp._C.lowbit_vnni(2, 2, 128, 1, 1536) and cpp._C.lowbit_vnni(2, 2, 256, 2, 4096)  # 2-bit codes
    assert cpp._C.lowbit_vnni(2, 2, 64, 1, 1536) and cpp._C.lowbit_vnni(2, 2, 32, 1, 1536)
    assert cpp._C.lowbit_vnni(2, 3, 128, 1, 1536) == _cpu_has_vbmi()  # 3-bit codes with VBMI
    assert cpp._C.lowbit_vnni(0, 3, 32, 2, 576) == _cpu_has_vbmi()
    assert not cpp._C.lowbit_vnni(0, 3, 8, 1, 576) and not cpp._C.lowbit_vnni(0, 3, 96, 1, 576)
    assert cpp._C.lowbit_vnni(2, 8, 32, 1, 1536)  # 8-bit codes in groups of part of a 64-byte chunk
    assert not cpp._C.lowbit_vnni(2, 8, 96, 1, 576)  # but not of one and a half
    assert not cpp._C.lowbit_vnni(2, 4, 192, 1, 576) and not cpp._C.lowbit_vnni(2, 2, 96, 1, 576)
    # By cpuid: the VNNI instruction sets take it (also without BF16), the others never.
    default = cpp._C.lowbit_isa()
    try:
        for isa in cpp._C.lowbit_isas():
            cpp._C.set_lowbit_isa(isa)
            vnni_isa = isa.startswith(("avx512_vnni", "avx512_bf16", "avx512_amx"))
            assert cpp._C.lowbit_vnni(2, 8, 128, 1, 1536) == vnni_isa, isa
    finally:
        cpp._C.set_lowbit_isa(default)


@pytest.mark.parametrize("bits,n,group,k", _VNNI_LAYOUTS + _LONG_GROUP_VNNI_LAYOUTS)
@pytest.mark.parametrize("scale_dtype", (torch.bfloat16, torch.float32))
@pytest.mark.parametrize("m", (1, 2))
def test_lowbit_vnni_layouts(bits, n, group, k, scale_dtype, m):
    _needs_vnni(bits)
    assert cpp._C.lowbit_vnni(2, bits, group, m, k)
    g = _gen(n + group + k + m + bits)
    qw = quantize_weight(torch.randn(n, k, generator=g), bits, group, dtype=scale_dtype)
    x = (torch.randn(m, k, generator=g) + 0.5).bfloat16()
    x[-1] *= 1000.0  # rows of their own scale: each row's groups get their own units
    b = torch.randn(n, generator=g).bfloat16() if scale_dtype == torch.bfloat16 else None
    y = _bf16_kernel_on_poisoned_output(x, qw, b, bits, group)
    assert _rel_err(y, _lowbit_want64(x, qw, b)) <= _vnni_tolerance(_lowbit_want64(x, qw, b))
    want = ref.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, group, b)
    assert _rel_err(y, want.double()) <= 1e-3


@pytest.mark.parametrize("bits,n,group,k", _VNNI_LAYOUTS)
def test_lowbit_vnni_fp16_rows_are_the_fp32_rows_rounded(bits, n, group, k):
    # fp16 rows take the VNNI path as the fp32 rows they convert to exactly, the result rounded to
    # fp16 once: bit for bit the fp32 rows' result rounded, bias included. A row with an infinity
    # declines there, and both dtypes take the fp32 kernels. (On the best instruction set without
    # AMX tiles: with them fp32 rows from 3 take the tiles, fp16 rows the fp32 kernels.)
    _needs_vnni(bits)
    default = cpp._C.lowbit_isa()
    cpp._C.set_lowbit_isa(_best_isa_without_amx())
    try:
        g = _gen(n + group + k + bits + 11)
        qw = quantize_weight(torch.randn(n, k, generator=g), bits, group, dtype=torch.float16)
        for m in (1, 2, 5):
            assert cpp._C.lowbit_vnni(0, bits, group, m, k)
            x = (torch.randn(m, k, generator=g) * 4.0).half()
            b = torch.randn(n, generator=g).half() if m == 2 else None
            y = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, group, b)
            want = cpp.lowbit_linear(x.float(), qw.qweight, qw.scale, qw.zero, bits, group, b).half()
            assert y.dtype == torch.float16 and _bits_equal(y, want), m
            assert _rel_err(y, _lowbit_want64(x, qw, b)) <= TOL[torch.float16], m
        x[-1, k // 2] = float("inf")
        y = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, group, None)
        want = cpp.lowbit_linear(x.float(), qw.qweight, qw.scale, qw.zero, bits, group, None).half()
        assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.nan_to_num(), want.nan_to_num())
        assert not y[-1].isfinite().any() and torch.isfinite(y[:-1]).all()
    finally:
        cpp._C.set_lowbit_isa(default)


def _fp32_kernel_on_poisoned_output(x: torch.Tensor, qw, b: torch.Tensor | None) -> torch.Tensor:
    """The extension's fp32 ``lowbit_linear`` of ``x [M, K]`` (fp32) straight into a NaN-filled
    output, which it must overwrite completely (asserted finite after)."""
    (m, k), n = x.shape, qw.qweight.shape[0]
    y = torch.full((m, n), float("nan"))
    cpp._C.lowbit_linear(
        x.data_ptr(), 0, m, k, qw.qweight.data_ptr(), n, qw.qweight.shape[1], qw.scale.data_ptr(), qw.zero.data_ptr(),
        cpp.DTYPE_CODE[qw.scale.dtype], qw.bits, qw.group_size, 0 if b is None else b.data_ptr(), y.data_ptr(),
    )
    assert torch.isfinite(y).all()
    return y


@pytest.mark.parametrize(
    "bits,n,group,k",
    # fp32 rows at any K; 70 rows of 16 KiB: from M = 3 spans of 16 weight rows (kVnniSpanBytes), the last of 6
    _VNNI_LAYOUTS + [(8, 9, 128, 4096), (4, 5, 1024, 8192), (8, 70, 64, 16384)],
)
@pytest.mark.parametrize("scale_dtype", (torch.bfloat16, torch.float32))
@pytest.mark.parametrize("m", (1, 2, 3, 8, 11, "most"))
def test_lowbit_vnni_fp32_rows(bits, n, group, k, scale_dtype, m):
    # fp32 rows on the fixed point keep the fp32 promise: each value within 2^-23 of its group's
    # largest, exact integer sums; each row's groups with their own units (a row 1000x the other).
    # From M = 3 in blocks of two rows, the last of one (M = 3) or two: on CPUs without AMX tiles
    # (with them, the tiles take those rows: the test runs there on the best instruction set
    # without); "most": 20 rows where K >= 1024 (3-bit codes 18), 14 where K >= 768, else 12.
    _needs_vnni(bits)
    if m == "most":
        m = (18 if bits == 3 else 20) if k >= 1024 else 14 if k >= 768 else 12
    default = cpp._C.lowbit_isa()
    if m > 2 and default == "avx512_amx":
        cpp._C.set_lowbit_isa(_best_isa_without_amx())
    try:
        assert cpp._C.lowbit_vnni(0, bits, group, m, k)
        g = _gen(n + group + k + m + bits + 7)
        qw = quantize_weight(torch.randn(n, k, generator=g), bits, group, dtype=scale_dtype)
        x = torch.randn(m, k, generator=g) + 0.5
        x[-1] *= 1000.0
        b = torch.randn(n, generator=g) if m == 2 else None
        y = _fp32_kernel_on_poisoned_output(x, qw, b)
    finally:
        cpp._C.set_lowbit_isa(default)
    want64 = _lowbit_want64(x, qw, b)
    assert ((y.double() - want64).norm(dim=1) / want64.norm(dim=1)).max() <= TOL[torch.float32]


@pytest.mark.parametrize("bits,n,group,k", _VNNI_LAYOUTS + _LONG_GROUP_VNNI_LAYOUTS + [(4, 5, 1024, 8192)])
def test_lowbit_vnni_fp32_row_with_outlier_groups(bits, n, group, k):
    # One fp32 row whose groups hold an outlier 10^4 above the rest (past what three digits carry
    # within 1e-5): it takes four digits, a 30-bit fixed point, in every layout; two such rows
    # decline to the fp32 kernels.
    _needs_vnni(bits)
    g = _gen(n + group + k + bits + 11)
    qw = quantize_weight(torch.randn(n, k, generator=g), bits, group)
    x = torch.randn(2, k, generator=g)
    x[:, 3::group] = 1e4
    x[:, 5::2 * group] = -3e4
    for m in (1, 2):
        y = _fp32_kernel_on_poisoned_output(x[:m], qw, None)
        want64 = _lowbit_want64(x[:m], qw, None)
        assert ((y.double() - want64).norm(dim=1) / want64.norm(dim=1)).max() <= TOL[torch.float32], m


@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("m", (1, 2))
def test_lowbit_vnni_long_groups_of_equal_values(bits, m):
    # Every value of a group of 1024 at the group's largest: each is 2^21 in the fixed point, and
    # the group's sum (its zero term) 2^31, past int32 (it wrapped once: 300x off).
    _needs_vnni(bits)
    k, group = 2048, 1024
    g = _gen(bits + m)
    qw = quantize_weight(torch.randn(24, k, generator=g), bits, group)
    x = torch.full((m, k), 3.0)
    x[:, group:] = -0.75  # the second group: also equal values, of their own unit
    for dtype in (torch.float32, torch.bfloat16):
        assert cpp._C.lowbit_vnni(cpp.DTYPE_CODE[dtype], bits, group, m, k)
        xd = x.to(dtype)
        want64 = _lowbit_want64(xd, qw, None)
        tol = TOL[torch.float32] if dtype == torch.float32 else _vnni_tolerance(want64)
        assert _rel_err(ops.lowbit_linear(xd, qw), want64) <= tol, dtype


@pytest.mark.parametrize("bits,n,group,k", _LONG_GROUP_VNNI_LAYOUTS)
@pytest.mark.parametrize("scale_dtype", (torch.bfloat16, torch.float32))
def test_lowbit_vnni_fp32_rows_of_long_groups(bits, n, group, k, scale_dtype):
    # fp32 rows against groups of 2048 codes or more (which the fp32 kernels took before), up to 18
    # rows (at most the VNNI path's fp32 rows on CPUs without AMX tiles; the test runs there on the
    # best instruction set without): within 1e-5 of float64 where the rows sit about zero. Far from
    # zero (0.5 + randn, 1000 times that, every value 3) each group's scaled code sum and zero term
    # nearly cancel, and a relative bound says little (both kernels 1-1.3e-5 at 8192 and 11008
    # codes): there each row stays within 8 eps ||x| |W|^T|| of float64, eps = 2^-24, the rounding
    # bound of an fp32 dot product (measured: this path 0.1-3.1 of it, the fp32 kernels 0.4-3.3, a
    # dense fp32 F.linear 0.07-1.6).
    _needs_vnni(bits)
    default = cpp._C.lowbit_isa()
    cpp._C.set_lowbit_isa(_best_isa_without_amx())
    g = _gen(n + group + k + bits)
    qw = quantize_weight(torch.randn(n, k, generator=g), bits, group, dtype=scale_dtype)
    w64 = ref.dequantize_weight(qw.qweight, qw.scale.double(), qw.zero.double(), bits, group, k)
    about_zero = torch.randn(18, k, generator=g)
    far = torch.randn(3, k, generator=g) + 0.5
    far[1] *= 1000.0
    far[2] = 3.0
    try:
        for m in (1, 2, 3, 18):
            assert cpp._C.lowbit_vnni(0, bits, group, m, k)
            y = _fp32_kernel_on_poisoned_output(about_zero[:m], qw, None)
            want64 = _lowbit_want64(about_zero[:m], qw, None)
            assert ((y.double() - want64).norm(dim=1) / want64.norm(dim=1)).max() <= TOL[torch.float32], m
        y = _fp32_kernel_on_poisoned_output(far, qw, None)
        bound = 8 * 2.0**-24 * (far.double().abs() @ w64.abs().T).norm(dim=1)
        assert ((y.double() - far.double() @ w64.T).norm(dim=1) <= bound).all()
    finally:
        cpp._C.set_lowbit_isa(default)


@pytest.mark.parametrize("bits,group,k", [(8, 128, 1536), (8, 64, 576), (4, 128, 1536), (4, 64, 576), (2, 128, 1536),
                                         (8, 32, 576), (4, 32, 576), (2, 64, 576), (3, 64, 576), (3, 32, 1536)])
def test_lowbit_vnni_fp32_hard_rows(bits, group, k):
    # Groups three digits cannot hold within 1e-5 (an outlier far above the group's mean: one row
    # takes four digits, more rows the fp32 kernels; a largest |x| below 2^-64: the fp32 kernels);
    # every row keeps the fp32 promise, alone and beside another row.
    _needs_vnni(bits)
    g = _gen(k + group + bits + 3)
    qw = quantize_weight(torch.randn(64, k, generator=g), bits, group)
    rows = list(_hard_rows(k, g).items()) + [("a row of 1e-30", torch.randn(1, k, generator=g) * 1e-30)]
    pairs = [(f"{a} / {b}", torch.cat([xa, xb])) for (a, xa), (b, xb) in zip(rows, rows[1:] + rows[:1])]
    # Up to M = 8 (the VNNI path's fp32 rows without AMX tiles): a hard row among plain ones declines
    # the whole call.
    plain = torch.randn(7, k, generator=g)
    mixed = [(f"{name} among 7 rows", torch.cat([plain[:3], x, plain[3:]])) for name, x in rows]
    for name, x in rows + pairs + mixed:
        y = _fp32_kernel_on_poisoned_output(x, qw, None)
        want64 = _lowbit_want64(x, qw, None)
        row_err = ((y.double() - want64).norm(dim=1) / want64.norm(dim=1)).max()
        assert row_err <= TOL[torch.float32], name


@pytest.mark.parametrize(
    "bits,group,k",
    [(8, 128, 4096), (4, 128, 4096), (3, 128, 4096), (2, 64, 4096), (4, 64, 11008), (2, 32, 4096), (4, 256, 4096)],
)
def test_lowbit_fp32_rows_far_from_zero_on_every_isa(each_isa, bits, group, k):
    # Activations far from zero (300 + randn, 3000 + randn) against unsigned codes: each group's
    # scaled code sum and its zero term are two large values that nearly cancel. Summed apart over
    # the row, their rounding put the fused FMA path 2e-5 (11008 columns: 5e-5), the AMX digits
    # 8e-5 and the VNNI path 9.5e-6 from float64; every kernel of every instruction set (M = 1-4
    # dot forms, digits, M = 6 and 16 GEMMs or tiles) must keep each row within 1e-5.
    g = _gen(k + group + bits)
    qw = quantize_weight(torch.randn(40, k, generator=g), bits, group)
    for offset in (300.0, 3000.0):
        x = torch.randn(16, k, generator=g) + offset
        want64 = _lowbit_want64(x, qw, None)
        for isa in each_isa:
            cpp._C.set_lowbit_isa(isa)
            for m in (1, 2, 3, 4, 6, 16):
                y = _fp32_kernel_on_poisoned_output(x[:m], qw, None)
                row_err = ((y.double() - want64[:m]).norm(dim=1) / want64[:m].norm(dim=1)).max()
                assert row_err <= TOL[torch.float32], (isa, offset, m, float(row_err))


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("offset", (0.0, 3.0, 300.0))
def test_lowbit_fp32_single_outputs_within_their_condition(each_isa, bits, offset):
    # One output column (N = 1): the relative error of a lone dot product whose terms cancel is
    # unbounded for any fp32 kernel (its terms x_k W_nk sum to near zero), so the promise is per
    # output against the sum of the terms' magnitudes: |y - exact| <= 2^-19 * sum_k |x_k W_nk|.
    # (Seen at most 2^-20.5 on every instruction set; torch's fp32 F.linear about 2^-23. The
    # zero-point form s * sum(q x) + z * sum(x) adds two terms larger than the result.)
    g = _gen(bits * 7 + int(offset))
    for group, k in ((16, 128), (32, 384), (128, 1024)):
        qw = quantize_weight(torch.randn(1, k, generator=g), bits, group)
        w64 = ref.dequantize_weight(qw.qweight, qw.scale.double(), qw.zero.double(), bits, group, k)
        x = torch.randn(16, k, generator=g) + offset
        want64 = x.double() @ w64.T
        bound = 2.0**-19 * (x.double().abs() @ w64.abs().T)
        for isa in each_isa:
            cpp._C.set_lowbit_isa(isa)
            for m in (1, 2, 4, 6, 16):
                y = _fp32_kernel_on_poisoned_output(x[:m], qw, None)
                excess = ((y.double() - want64[:m]).abs() / bound[:m]).max()
                assert excess <= 1, (isa, group, k, m, float(excess))

def _vnni_tolerance(want64: torch.Tensor) -> float:
    """Error against the exact result allowed to a bf16 output: its own rounding (a few outputs
    alone can exceed TOL) plus 1e-3 (also used by the 3-bit fallback test)."""
    return _rel_err(want64.bfloat16(), want64) + 1e-3


def _hard_rows(k: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Activation rows [1, k] that stress a per-group fixed point (group 128 or 64)."""
    r = lambda: torch.randn(1, k, generator=g)  # noqa: E731
    outlier_every_group = r()
    outlier_every_group[:, ::64] = 1e4
    big_and_tiny = r() * 1e-3
    big_and_tiny[:, ::64] = torch.randn(1, k // 64, generator=g) * 100
    zero_groups = r()
    zero_groups[:, 64:192] = 0
    return {
        "log-uniform magnitudes 2^-30..2^10": r() * torch.exp2(torch.randint(-30, 10, (1, k), generator=g).float()),
        "groups scaled 2^-60..2^60": r() * torch.exp2((torch.arange(k) // 64 % 21) * 6.0 - 60),
        "a few outlier columns": r().index_fill_(1, torch.randint(0, k, (3,), generator=g), 3000.0),
        "an outlier in every group": outlier_every_group,
        "large and tiny in one group": big_and_tiny,
        "zero groups and subnormal bf16": torch.cat([zero_groups[:, : k // 2], r()[:, k // 2 :] * 1e-39], 1),
        "far from zero": r() + 300,
    }


@pytest.mark.parametrize("bits,n,group,k", [(8, 64, 128, 1536), (8, 64, 64, 576), (4, 64, 128, 1536), (4, 64, 64, 576),
                                            (2, 64, 128, 1536), (2, 64, 256, 1536), (8, 64, 32, 576), (4, 64, 32, 576),
                                            (2, 64, 64, 576), (3, 64, 64, 576), (3, 64, 128, 1536)])
def test_lowbit_vnni_hard_activations(bits, n, group, k):
    # The fixed point keeps every value of at least 2^-14 of its group's largest exactly and
    # moves smaller ones by at most 2^-22 of it: against the reference op (both round to bf16)
    # the error must stay well inside the op's 1e-3 promise (bf16 roundings that flip make
    # up most of it), and against the exact result within 1e-3 beyond the output's rounding.
    _needs_vnni(bits)
    # Each row alone, then each beside the next (two rows, each with its own units and sums).
    assert cpp._C.lowbit_vnni(2, bits, group, 2, k)
    g = _gen(k + group + bits)
    qw = quantize_weight(torch.randn(n, k, generator=g), bits, group, dtype=torch.bfloat16)
    rows = list(_hard_rows(k, g).items())
    pairs = [(f"{a} / {b}", torch.cat([xa, xb])) for (a, xa), (b, xb) in zip(rows, rows[1:] + rows[:1])]
    for name, x in rows + pairs:
        x = x.bfloat16()
        y = _bf16_kernel_on_poisoned_output(x, qw, None, bits, group)
        want = ref.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, group, None).double()
        for row in range(x.shape[0]):
            assert _rel_err(y[row], want[row]) <= 5e-4, (name, row)
            want64 = _lowbit_want64(x[row : row + 1], qw, None)
            assert _rel_err(y[row : row + 1], want64) <= _vnni_tolerance(want64), (name, row)


@pytest.mark.parametrize("bits", (8, 4, 3, 2))
def test_lowbit_vnni_non_finite_activations(bits):
    # NaN or infinity in x: the fixed point has no room for them, so the bf16 kernels run and
    # no output is finite (the reference gives NaN or +-inf; the bf16 kernels' s * sum(q x) +
    # z * sum(x) turns an infinity into NaN).
    _needs_vnni(bits)
    assert cpp._C.lowbit_vnni(2, bits, 128, 2, 256)
    # With two rows, the other row's outputs stay finite and right.
    g = _gen(11)
    qw = quantize_weight(torch.randn(32, 256, generator=g), bits, 128, dtype=torch.bfloat16)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(1, 256, generator=g).bfloat16()
        x[0, 200] = bad
        y = _bf16_kernel_on_poisoned_output(x, qw, None, bits, 128, finite=False)
        assert not torch.isfinite(y).any()
        assert not torch.isfinite(ref.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, 128, None)).any()
        x2 = torch.cat([torch.randn(1, 256, generator=g).bfloat16(), x])
        y2 = _bf16_kernel_on_poisoned_output(x2, qw, None, bits, 128, finite=False)
        assert not torch.isfinite(y2[1]).any()
        assert _rel_err(y2[:1], _lowbit_want64(x2[:1], qw, None)) <= _vnni_tolerance(_lowbit_want64(x2[:1], qw, None))


@pytest.mark.parametrize("bits,group", [(8, 128), (4, 64), (2, 128), (2, 32), (3, 64)])
@pytest.mark.parametrize("m", (2, 5))
def test_lowbit_vnni_fp32_non_finite_activations(bits, group, m):
    # fp32 rows with a NaN or an infinity leave the fixed point to the fp32 kernels: every output of
    # that row is NaN or infinite as the reference's, and the finite rows beside it keep 1e-5. At
    # M = 5 (blocks of two rows, then one, without AMX tiles) the bad row sits in the second block.
    _needs_vnni(bits)
    assert cpp._C.lowbit_vnni(0, bits, group, 2, 512)
    g = _gen(13 + bits)
    qw = quantize_weight(torch.randn(32, 512, generator=g), bits, group)
    row = m - 2
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(m, 512, generator=g)
        x[row, 300] = bad
        y = torch.full((m, 32), 7.0)
        cpp._C.lowbit_linear(x.data_ptr(), 0, m, 512, qw.qweight.data_ptr(), 32, qw.qweight.shape[1],
                             qw.scale.data_ptr(), qw.zero.data_ptr(), cpp.DTYPE_CODE[qw.scale.dtype], bits, group, 0,
                             y.data_ptr())
        assert not torch.isfinite(y[row]).any() and not (y[row] == 7).any()
        want = ref.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, group, None)
        assert not torch.isfinite(want[row]).any()
        finite = [i for i in range(m) if i != row]
        assert _rel_err(y[finite], _lowbit_want64(x[finite], qw, None)) <= TOL[torch.float32]


# ---------------------------------------------------------------- AMX tiles


def _needs_amx() -> None:
    if "avx512_amx" not in cpp._C.lowbit_isas():
        pytest.skip("this CPU or OS has no AMX-BF16 tiles: the AMX kernels never run here")


@pytest.fixture
def amx_isa():
    """The AMX instruction set for the test body (skips where the CPU has none)."""
    _needs_amx()
    default = cpp._C.lowbit_isa()
    cpp._C.set_lowbit_isa("avx512_amx")
    yield
    cpp._C.set_lowbit_isa(default)


# Rows from which the AMX tiles hold W dequantised to bf16 (scaled panels), by group size
# (amx_scaled_min_rows in lowbit_kernels.h).
AMX_SCALED_FROM = {32: 8, 64: 80, 128: 192}


def _amx_scaled_from(group):
    return AMX_SCALED_FROM.get(group, 256)


# 2/3/4/8-bit codes from amx_min_rows bf16 activation rows (3 for 3 bits and for 4 bits in groups
# of 128 or more, 4 for the other 2/4-bit layouts, 2 for 8 bits) on AMX
# tiles: exact codes with each group's sums scaled in fp32, so within the bf16 output's own
# rounding of float64; from _amx_scaled_from rows (here groups of 32 from 8) x @ bf16(W)^T. N in
# one partial 32-row panel, past whole panels, several panels; M on both sides of the switches and
# of whole 16-row tiles; groups of one to eight 32-code blocks (4-bit codes in groups of 128 and 256
# take the pair-order decode, AmxCodes::pairs); fresh data each case.
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group,k", [(32, 64), (64, 576), (128, 896), (32, 1056), (256, 1280)])
@pytest.mark.parametrize("m", (2, 3, 4, 5, 7, 8, 16, 17, 40))
def test_lowbit_amx_tiles(amx_isa, bits, group, k, m):
    for n in (1, 45, 96):
        x, qw, b = _lowbit_case(n, k, m, bits, group, torch.bfloat16, bias=n != 96, seed=bits * 100 + group + m + n)
        y = _bf16_kernel_on_poisoned_output(x, qw, b, bits, group)
        want = _lowbit_want64_bf16_weight(x, qw, b) if m >= _amx_scaled_from(group) else _lowbit_want64(x, qw, b)
        assert _rel_err(y, want) <= _rel_err(want.bfloat16(), want) + 1e-4, n


@pytest.mark.parametrize(
    "bits,group,k", [(4, 32, 576), (8, 128, 1024), (4, 64, 2112), (2, 64, 576), (3, 32, 1056), (4, 256, 1280)]
)
def test_lowbit_amx_scaled_tiles_from_switch(amx_isa, fp32_precision, bits, group, k):
    # From _amx_scaled_from(group) bf16 rows (8 to 256) the tiles hold W dequantised to bf16 and sum
    # over the whole K: the result is x @ bf16(W)^T with fp32 sums; a row fewer keeps the exact
    # codes (the two differ by more than the bf16 output's rounding). fp32 rows under "medium" give
    # the fp32 sums themselves.
    m = _amx_scaled_from(group)
    x, qw, b = _lowbit_case(70, k, m, bits, group, torch.bfloat16, bias=True, seed=bits + group + k)
    y = _bf16_kernel_on_poisoned_output(x, qw, b, bits, group)
    below = _bf16_kernel_on_poisoned_output(x[: m - 1], qw, b, bits, group)
    want16, want64 = _lowbit_want64_bf16_weight(x, qw, b), _lowbit_want64(x, qw, b)
    assert _rel_err(y, want16) <= _rel_err(want16.bfloat16(), want16) + 2e-4
    assert _rel_err(y, want64) <= TOL[torch.bfloat16]
    assert _rel_err(below, want64[: m - 1]) <= _rel_err(want64[: m - 1].bfloat16(), want64[: m - 1]) + 1e-4
    fp32_precision("medium")
    y32 = cpp.lowbit_linear(x.float(), qw.qweight, qw.scale, qw.zero, bits, group, b.float())
    assert _rel_err(y32, want16) <= 3e-5


@pytest.mark.parametrize("dtype,k", [(torch.bfloat16, 1088), (torch.float32, 2624)])
def test_lowbit_amx_large_m_cache_blocks(amx_isa, dtype, k):
    # The scaled panels (bf16, from 256 rows) and fp32 rows' digit tiles where they outgrow L2
    # (2 MiB: here 257 rows x 2624 codes) run in cache blocks: k-chunks of all activation tiles
    # (uneven: 34 k-blocks as 12 + 12 + 10; 41 groups as 10 + 10 + 10 + 10 + 1) across groups of
    # up to 8 panels (300 rows: 8 panels, then one and a 12-row part), an odd 17th activation tile.
    # The same promises as without blocks, into a poisoned output.
    x, qw, b = _lowbit_case(300, k, 257, 4, 64, dtype, bias=True, seed=k)
    if dtype == torch.bfloat16:
        y = _bf16_kernel_on_poisoned_output(x, qw, b, 4, 64)
        want16 = _lowbit_want64_bf16_weight(x, qw, b)
        assert _rel_err(y, want16) <= _rel_err(want16.bfloat16(), want16) + 2e-4
        return
    y = torch.full((257, 300), float("nan"))
    cpp._C.lowbit_linear(x.data_ptr(), cpp.DTYPE_CODE[dtype], 257, k, qw.qweight.data_ptr(), 300, qw.qweight.shape[1], qw.scale.data_ptr(),
                         qw.zero.data_ptr(), cpp.DTYPE_CODE[dtype], 4, 64, b.data_ptr(), y.data_ptr())
    want = _lowbit_want64(x, qw, b)
    assert ((y.double() - want).norm(dim=1) / want.norm(dim=1)).max() <= TOL[torch.float32]


@pytest.mark.parametrize("bits", (4, 8))
@pytest.mark.parametrize("m", (5, 19))
def test_lowbit_amx_fp32_rows_under_medium_precision(amx_isa, fp32_precision, bits, m):
    # fp32 activations under torch's "medium" precision are rounded to bf16 and take the tiles
    # too (5 rows: as int8 digit planes), with fp32 sums and output: the exact product of the
    # rounded activations.
    fp32_precision("medium")
    x, qw, b = _lowbit_case(70, 640, m, bits, 64, torch.float32, bias=True, seed=bits)
    y = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, 64, b)
    want64 = _lowbit_want64(x.bfloat16(), qw, b)
    assert _rel_err(y, want64) <= 1e-5


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("m", (2, 3, 5, 6, 16, 17, 27, 40))
@pytest.mark.parametrize("group,k", [(64, 576), (128, 640), (32, 544)])
def test_lowbit_amx_fp32_rows_as_bf16_parts(amx_isa, bits, m, group, k):
    # fp32 activations ("highest" precision) take the tiles as three bf16 parts per row: each row
    # within the fp32 promise, also a row of 1e-37 (its parts would be subnormal, which the tiles
    # read as zero: such a call runs on the fp32 kernels) and one of 1e30. The 2-4-bit decodes add
    # their small offset (AmxCodes::fine): 4-bit codes in groups of 128 in pair order, else natural.
    # From 2 rows (groups of 64: 3), K and groups multiples of 64 (not (32, 544)), the rows go as
    # int8 digit planes instead (AMX-INT8), one unit per row and group, five rows' planes to a tile
    # or (16, 27, 40 rows) a tile per plane of 16 rows: there a zero group, a group of 1e20 beside
    # ones of 1 (which declines to the parts), and the tiny row (to the fp32 kernels).
    g = _gen(70 + bits + m + group)
    qw = quantize_weight(torch.randn(45, k, generator=g), bits, group)
    w64 = ref.dequantize_weight(qw.qweight, qw.scale.double(), qw.zero.double(), bits, group, k)
    b = torch.randn(45, generator=g)
    for scale in (None, 1e-37, 1e30, "groups"):
        x = torch.randn(m, k, generator=g)
        if scale == "groups":
            x[0, :group] = 0
            x[m - 1, group:2 * group] *= 1e20
        elif scale is not None:
            x[m // 2] *= scale
        y = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, group, b)
        want = x.double() @ w64.T + b.double()
        row_err = ((y.double() - want).norm(dim=1) / want.norm(dim=1)).max()
        assert row_err <= TOL[torch.float32], scale
    x[1, 3] = float("nan")  # the fp32 kernels carry it: that row's outputs only
    y = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, group, None)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[torch.arange(m) != 1]).all()


def test_lowbit_amx_takes_its_layouts_and_rows_only(amx_isa):
    # Groups of 16 codes and M below the switch (3 rows for 4-bit codes, 4 in groups below 128
    # codes and for 2-bit codes, 3 for 3-bit codes, 2 for 8-bit; the int8 digit planes take 3-5
    # rows of 8-bit codes and 3-5 of the natural decode's 2-4-bit codes where K and the group
    # size are multiples of 64)
    # stay on the vector kernels, except 8-bit codes there, which take the fp32 (FMA) kernels, and
    # one or two rows in the VNNI path's layouts (groups of chunks or parts of one), which take the
    # VNNI path as with the AVX-512 BF16 kernels or VNNI alone: the paths' fp32 sums differ in the
    # last bits, so which one ran shows in the fp32 output of bf16-valued fp32 rows (the "medium"
    # path).
    def run(x, qw, bits, group):
        (m, k), n = x.shape, qw.qweight.shape[0]
        y = torch.full((m, n), float("nan"))
        cpp._C.lowbit_linear(x.data_ptr(), 0, m, k, qw.qweight.data_ptr(), n, qw.qweight.shape[1],
                             qw.scale.data_ptr(), qw.zero.data_ptr(), 0, bits, group, 0, y.data_ptr(), True)
        return y

    vector = _best_vector_bf16_isa()
    for bits, group, m, path in ((4, 128, 3, "tiles"), (4, 64, 4, "tiles"), (4, 64, 3, "tiles"), (4, 64, 2, vector),
                                 (4, 32, 3, vector), (4, 128, 2, vector), (2, 128, 2, vector),
                                 (8, 128, 3, "tiles"), (8, 128, 2, "avx512_bf16"), (8, 32, 2, "avx512_bf16"),
                                 (8, 128, 1, "avx512_vnni"), (8, 16, 4, "avx512"), (2, 128, 16, "tiles"),
                                 (2, 64, 4, "tiles"), (2, 128, 3, "tiles"), (3, 128, 3, "tiles"), (3, 64, 2, vector),
                                 (4, 16, 16, vector)):
        x, qw, _ = _lowbit_case(64, 2048 if m == 1 else 512, m, bits, group, torch.float32, bias=False, seed=bits + m)
        x = x.bfloat16().float()
        y = run(x, qw, bits, group)
        cpp._C.set_lowbit_isa(vector if path == "tiles" else path)
        y_other = run(x, qw, bits, group)
        cpp._C.set_lowbit_isa("avx512_amx")
        assert torch.isfinite(y).all() and torch.equal(y, y_other) != (path == "tiles"), (bits, group, m)
        if path.startswith("avx512"):  # the same for bf16 rows
            xb = x.bfloat16()
            y16 = cpp.lowbit_linear(xb, qw.qweight, qw.scale, qw.zero, bits, group, None)
            cpp._C.set_lowbit_isa(path)
            y16_other = cpp.lowbit_linear(xb, qw.qweight, qw.scale, qw.zero, bits, group, None)
            cpp._C.set_lowbit_isa("avx512_amx")
            assert torch.equal(y16, y16_other), (bits, group, m)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
@pytest.mark.parametrize("bits", (2, 8))
def test_lowbit_amx_digits_keep_outlier_groups(amx_isa, dtype, bits):
    # The int8 digit planes hold each value to 2^-23 of its group's largest: a group whose outlier
    # is 10^4 times its other values (as hidden states carry) keeps the dtype's promise (5 rows:
    # bf16 rows on the digits; fp32 rows decline such a group to the bf16 parts,
    # kDigitOutlierRatio). bf16 rows also where the outlier meets a zero weight and the output is
    # the small values' sum (fp32 rows lose 1e-4 there on every path that adds zero * sum(x) to
    # scale * sum(q x), the fp32 kernels' dequantised weights aside).
    g = _gen(80 + bits)
    k, group = 512, 128
    qw = quantize_weight(torch.randn(64, k, generator=g), bits, group, dtype=dtype)
    w64 = ref.dequantize_weight(qw.qweight, qw.scale.double(), qw.zero.double(), bits, group, k)
    x = torch.randn(5, k, generator=g)
    x[:, 7] = 1e4 * torch.sign(x[:, 7])
    x = x.to(dtype)
    for zero_column in (False, True) if dtype == torch.bfloat16 else (False,):
        w = w64.clone()
        if zero_column:  # the outlier's weights zero: scale the others' share up instead
            w[:, 7] = 0
        y = torch.empty(5, 64, dtype=dtype)
        q = quantize_weight(w.float(), bits, group, dtype=dtype) if zero_column else qw
        wq = ref.dequantize_weight(q.qweight, q.scale.double(), q.zero.double(), bits, group, k)
        y = cpp.lowbit_linear(x, q.qweight, q.scale, q.zero, bits, group, None)
        want = x.double() @ wq.T
        assert _rel_err(y, want) <= (_rel_err(want.bfloat16(), want) + 1e-4 if dtype == torch.bfloat16
                                     else TOL[torch.float32]), zero_column


@pytest.mark.parametrize("bits", (4, 8))
@pytest.mark.parametrize("m", (5, 18))
def test_lowbit_amx_non_finite_activations(amx_isa, bits, m):
    # NaN or infinity in x: as on the vector bf16 kernels, every output of the rows holding it is
    # non-finite (s * sum(q x) + z * sum(x) turns an infinity into NaN) and the other rows finite;
    # at 5 rows the int8 digit planes decline the call to the bf16 tiles.
    g = _gen(60 + bits)
    qw = quantize_weight(torch.randn(40, 256, generator=g), bits, 64, dtype=torch.bfloat16)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(m, 256, generator=g).bfloat16()
        x[m - 1, 9] = bad
        y = torch.full((m, 40), float("nan"), dtype=torch.bfloat16)
        y[m - 1] = 7
        cpp._C.lowbit_linear(x.data_ptr(), 2, m, 256, qw.qweight.data_ptr(), 40, qw.qweight.shape[1],
                             qw.scale.data_ptr(), qw.zero.data_ptr(), 2, bits, 64, 0, y.data_ptr())
        assert torch.isfinite(y[:m - 1]).all() and not torch.isfinite(y[m - 1]).any(), bad


# ---------------------------------------------------------------- int8 linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (17, 33, 100), (2, 6, 259)])
def test_int8_linear_bit_identical(dtype, shape):
    m, n, k = shape
    g = _gen(m * n * k)
    wq, ws = quantize_weight_int8(torch.randn(n, k, generator=g))
    x = torch.randn(m, k, generator=g).to(dtype)
    x[0] = 0  # a zero row quantises with scale 1
    for bias in (None, torch.randn(n, generator=g), torch.randn(n, generator=g).half()):
        got = cpp.int8_linear(x, wq, ws, bias)
        assert _bits_equal(got, ref.int8_linear(x, wq, ws, bias))
    x3 = x.reshape(1, m, k)
    assert _bits_equal(ops.int8_linear(x3, wq, ws), ref.int8_linear(x3, wq, ws, None))


def test_int8_linear_empty():
    wq, ws = quantize_weight_int8(torch.randn(4, 8))
    assert cpp.int8_linear(torch.randn(0, 8), wq, ws, None).shape == (0, 4)


# ---- instruction-set paths, decode orders, BLAS path, worker pool ---------------------------


@pytest.fixture
def each_isa():
    """Runs the test body once per instruction set this CPU supports, restoring the default."""
    default = cpp._C.lowbit_isa()
    yield cpp._C.lowbit_isas()
    cpp._C.set_lowbit_isa(default)


@pytest.mark.parametrize("bits,group,k", [(4, 8, 384), (4, 8, 904)])
def test_one_fp32_row_runs_as_bf16_parts_on_the_bf16_kernels(each_isa, bits, group, k):
    # M = 1 with fp32 activations goes to the bf16 kernels as three bf16 parts of the row: as exact
    # as the fp32 kernels (far inside 1e-5 with the fine decode; 2-bit sums missed it with the
    # bf16 path's offset of 128), but not their summation, so the two results are not identical.
    # (2- and 4-bit codes in groups of 16 codes or more, and with VBMI 3-bit codes, take the VNNI
    # path first: only 4-bit codes in groups of 8 are left here.)
    _needs_bf16_kernels()
    best = _best_vector_bf16_isa()
    worst = 0.0
    for seed in range(6):
        x, qw, b = _lowbit_case(45, k, 1, bits, group, torch.float32, bias=seed % 2 == 0, seed=seed)
        x = x * torch.exp(2 * torch.randn(x.shape, generator=_gen(seed + 50)))  # heavy tails
        cpp._C.set_lowbit_isa("avx512")
        fp32_kernel = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, group, b)
        cpp._C.set_lowbit_isa(best)
        parts = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, group, b)
        want64 = _lowbit_want64(x, qw, b)
        worst = max(worst, _rel_err(parts, want64))
        assert not torch.equal(parts, fp32_kernel)
        if "avx512_amx" in each_isa:  # there the fp32 (FMA) kernels take the row (Isa::fma_few_rows)
            cpp._C.set_lowbit_isa("avx512_amx")
            assert torch.equal(cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, group, b), fp32_kernel)
            cpp._C.set_lowbit_isa(best)
        # A value that is not finite (or too large for bf16) sends the row to the fp32 kernels.
        for bad in (float("inf"), float("nan"), 3.4e38):
            xb = x.clone()
            xb[0, k // 2] = bad
            cpp._C.set_lowbit_isa("avx512")
            fp32_bad = cpp.lowbit_linear(xb, qw.qweight, qw.scale, qw.zero, bits, group, b)
            cpp._C.set_lowbit_isa(best)
            assert torch.equal(cpp.lowbit_linear(xb, qw.qweight, qw.scale, qw.zero, bits, group, b).isnan(),
                               fp32_bad.isnan()), bad
    assert worst <= 4e-6, worst


@pytest.fixture
def fp32_precision():
    """Sets torch's fp32 matmul precision for the test body (``set(name)``), restoring it after."""
    saved = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(saved)


@pytest.mark.parametrize("bits,group,k", [(2, 32, 384), (3, 128, 384), (4, 128, 384), (4, 32, 96), (8, 64, 128)])
@pytest.mark.parametrize("m", (1, 2, 5, 7, 300))
def test_fp32_rows_as_bf16_where_torch_precision_allows(each_isa, fp32_precision, bits, group, k, m):
    # Under torch's "medium" fp32 matmul precision, fp32 rows (one row too, which is otherwise sent
    # exactly as three bf16 parts) take the bf16 kernels rounded to bf16, with fp32 sums and output:
    # the result is the exact product of the rounded activations (so neither the exact
    # activations' nor a bf16 output's), in the bf16 kernels' dot form and panel (M >= 5) alike.
    _needs_bf16_kernels()
    best = _best_vector_bf16_isa()
    if bits == 3 and best != "avx512_bf16_vbmi":
        pytest.skip("3-bit codes take the bf16 kernels only with VBMI")
    cpp._C.set_lowbit_isa(best)
    x, qw, b = _lowbit_case(45, k, m, bits, group, torch.float32, bias=m % 2 == 1, seed=bits * 10 + m)
    run = lambda v: cpp.lowbit_linear(v, qw.qweight, qw.scale, qw.zero, bits, group, b)  # noqa: E731
    exact = run(x)
    fp32_precision("medium")
    assert cpp.fp32_matmul_allows_bf16()
    y = run(x)
    assert y.dtype == torch.float32 and y.shape == (m, 45)
    # 2-bit sums lose ~1.5e-5 to the kernels' code offset (test_one_fp32_row_runs_as_bf16_parts...).
    assert _rel_err(y, _lowbit_want64(x.bfloat16().float(), qw, b)) <= 3e-5
    assert 1e-4 < _rel_err(y, _lowbit_want64(x, qw, b)) <= 4e-3
    # A value that is not finite, or too large for bf16, keeps x on the fp32 kernels: the same
    # values as under "highest", NaN and infinities included.
    for bad in (float("inf"), float("nan"), 3.4e38, 0x7FFFFFFF):  # the last: NaN bits that round to -0
        xb = x.clone()
        if isinstance(bad, int):
            xb.view(torch.int32)[m - 1, k // 2] = bad
        else:
            xb[m - 1, k // 2] = bad
        fp32_precision("highest")
        want = run(xb)
        fp32_precision("medium")
        torch.testing.assert_close(run(xb), want, rtol=0, atol=0, equal_nan=True, msg=str(bad))
    # Elsewhere (the default "highest", and "high": two bf16 parts ran no faster) x stays exact.
    for name in ("highest", "high"):
        fp32_precision(name)
        assert not cpp.fp32_matmul_allows_bf16()
        assert torch.equal(run(x), exact), name


def test_fp32_precision_read_from_the_onednn_setting(fp32_precision):
    # torch >= 2.9 sets precisions per backend; oneDNN's matmul setting is the one that counts here.
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if getattr(matmul, "fp32_precision", None) is None:
        pytest.skip(f"torch {torch.__version__} has no per-backend fp32 precision (the legacy setting is read)")
    try:
        matmul.fp32_precision = "bf16"
        assert cpp.fp32_matmul_allows_bf16()
        matmul.fp32_precision = "tf32"
        assert not cpp.fp32_matmul_allows_bf16()
    finally:
        matmul.fp32_precision = "none"
    assert not cpp.fp32_matmul_allows_bf16()


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize(
    "bits,group,k",
    [(2, 256, 512), (3, 128, 384), (3, 64, 192), (3, 24, 96), (4, 128, 384), (4, 64, 192), (8, 64, 128), (4, 3, 96),
     (2, 32, 160), (3, 32, 96), (3, 96, 288), (2, 48, 144), (8, 24, 72),
     (2, 64, 576), (2, 32, 288), (2, 16, 272), (2, 16, 304), (4, 32, 160), (4, 16, 144)],
)
@pytest.mark.parametrize("m", (1, 4, 5, 6, 7, 13, 21, 27, 33))
def test_lowbit_linear_every_isa_agrees_with_generic(each_isa, dtype, bits, group, k, m):
    # n = 45: a short last block for every row tiling (4-, 8- and 32-row blocks); m = 5 and 6 take
    # the fp32 kernels' fused path at its widest (groups of 3: natural order, a decoded row dotted
    # with each x row); the fp32 kernels step through a group's phases (3 bits: units) at 16, 8 or
    # 4 lanes, the widest that divides them (2 bits in groups of 32, 3 bits in groups of 64: 8
    # lanes on AVX-512; 2 bits in groups of 48, 3 bits in groups of 32 and 96: 4 lanes; 8 bits in
    # groups of 24: 8), and 3 bits in groups of 24 have 3 units, left one by one; the last group
    # of a 3-bit row is read with masked loads; odd m leaves short activation tiles; 13 / 21 /
    # 27 / 33 rows run their GEMM's two- and three-tile steps and mixes (2, 3, 3 + 1, 3 + 2 tiles).
    # The bf16 dot form packs a 2-bit row's last chunk of at most 16 bytes into fewer vectors:
    # K = 576 / 288 / 304 / 272 leave 16 / 8 / 12 / 4 bytes (4, 2, 4, 1 lanes of 16: two, four or
    # eight pair vectors a vector); 4 bits at K = 160 / 144 leave partial chunks of 16 / 8 bytes.
    x, qw, b = _lowbit_case(45, k, m, bits, group, dtype, bias=True, seed=bits * 100 + m)
    want64 = _lowbit_want64(x, qw, b)
    outs = {}
    for isa in each_isa:
        cpp._C.set_lowbit_isa(isa)
        outs[isa] = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, group, b)
        assert _rel_err(outs[isa], want64) <= TOL[dtype], isa
    # Paths differ only in summation order: they agree with the scalar build far inside the tolerance.
    for isa, y in outs.items():
        assert _rel_err(y, outs["generic"].double()) <= TOL[dtype], isa


@pytest.mark.parametrize("bits,group,k", [(2, 128, 4096), (3, 128, 4096), (3, 64, 2752), (4, 128, 4096), (8, 64, 2048)])
@pytest.mark.parametrize("m", (1, 2, 3, 4))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_lowbit_linear_long_rows_every_isa(each_isa, dtype, bits, group, k, m):
    # Rows of 1-4 KiB: the bf16 dot form reads 1, 8, 4, 4 or 3 weight rows at a time by row
    # length and M (an fp32 row as three bf16 parts too; n = 22 leaves short blocks), and 3-bit
    # chunks with whole 64-byte loads but the last of each row (K = 2752: a last chunk of 24
    # bytes, the one before it 72 bytes from the row's end).
    x, qw, b = _lowbit_case(22, k, m, bits, group, dtype, bias=True, seed=bits * 10 + m)
    want64 = _lowbit_want64(x, qw, b)
    for isa in each_isa:
        cpp._C.set_lowbit_isa(isa)
        y = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, group, b)
        assert _rel_err(y, want64) <= TOL[dtype], isa


@pytest.mark.parametrize("m", (1, 2, 3, 5, 9))
@pytest.mark.parametrize("n,k", [(1, 1), (13, 63), (37, 64), (21, 65), (9, 200), (11, 768), (70, 1030), (6, 1601)])
def test_int8_linear_every_isa_bit_identical(each_isa, m, n, k):
    # K around the 64/32/16-byte vector steps (masked and scalar tails), N with short 4- and
    # 8-row tiles, K = 1030 with several weight-row blocks; rows in address order (kInOrderMinK)
    # at M = 1 from K = 768 on VNNI (no tail), from 576 without it (K = 768, 1030 and 1601: tails
    # of 6 and 1 past the 16- and 32-byte steps), at M = 2-3 at K = 1601 on every vector ISA;
    # weights span the full int8 range (-128 included), activations a mix of magnitudes and a zero row.
    g = _gen(m * 1000 + n * k)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    w[0, 0] = -128
    ws = torch.rand(n, generator=g) + 0.5
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 3, k)
    if m > 1:
        x[1] = 0
    bias = torch.randn(n, generator=g)
    want = ref.int8_linear(x, w, ws, bias)
    for isa in each_isa:
        cpp._C.set_lowbit_isa(isa)
        for dtype in (torch.float32, torch.bfloat16):
            assert _bits_equal(cpp.int8_linear(x.to(dtype), w, ws, bias), ref.int8_linear(x.to(dtype), w, ws, bias)), (isa, dtype)
        assert _bits_equal(cpp.int8_linear(x, w, ws, None), ref.int8_linear(x, w, ws, None)), isa
    assert _bits_equal(cpp.int8_linear(x, w, ws, bias), want)


def test_isa_choice_errors():
    with pytest.raises(ValueError, match="isa must be one of .*avx512_bf16_vbmi, avx512_amx; got 'sse9'"):
        cpp._C.set_lowbit_isa("sse9")
    assert cpp._C.lowbit_isa() in cpp._C.lowbit_isas() and cpp._C.lowbit_isas()[0] == "generic"
    # A known set this CPU (or its OS: AMX needs Linux's grant of the tile state) lacks is refused.
    default = cpp._C.lowbit_isa()
    for name in ("avx2", "avx512", "avx512_vnni", "avx512_bf16", "avx512_bf16_vbmi", "avx512_amx"):
        if name not in cpp._C.lowbit_isas():
            with pytest.raises(ValueError, match=f"isa '{name}' is not supported by this CPU"):
                cpp._C.set_lowbit_isa(name)
            assert cpp._C.lowbit_isa() == default


def test_extension_exports_only_its_init_function():
    # Kernel symbols left visible let a second copy of the extension in the same process (another
    # install, a build under test) bind its calls to the first copy's kernels (CMakeLists.txt).
    import ctypes

    lib = ctypes.CDLL(cpp._C.__file__)
    assert hasattr(lib, "PyInit__C")
    for symbol in ("_ZN2sk11isa_generic14lowbit_kernelsEv", "_ZN2sk11isa_generic12int8_kernelsEv"):
        assert not hasattr(lib, symbol), symbol


def test_fp32_gemm_over_several_row_blocks(each_isa):
    # The fp32 kernels' GEMM (M > 6) takes activation rows in blocks of about 8 MiB (K = 1024:
    # 2048 rows), K in slices of whole groups and N in blocks of weight rows with a short last
    # one: every row, block and column must come out right on every build.
    x, qw, b = _lowbit_case(45, 1024, 2100, 4, 128, torch.float32, bias=True, seed=5)
    want64 = _lowbit_want64(x, qw, b)
    for isa in each_isa:
        cpp._C.set_lowbit_isa(isa)
        y = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 4, 128, b)
        row_err = ((y.double() - want64).norm(dim=1) / want64.norm(dim=1)).max()
        assert row_err <= 1e-5, isa


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_fp32_fused_rows_exact_on_integers(each_isa, bits):
    # The fused path (M <= 6) is compiled apart for groups of 32, 64 and 128 (constant phase
    # offsets, unrolled steps) and for any other size at run time. Small integer activations,
    # scales and zeros give integer sums that fp32 holds exactly: a code read from the wrong
    # place, group or phase changes the result, which must equal the integer product. K = 2752
    # at M >= 4 and 3456 at M >= 3 take K in slices through a block of 16 weight rows and a short
    # one, with a short last slice (at M = 4: 43 groups of 64 as 16, 16, 11; 36 of 96 as 10, 10,
    # 10, 6).
    g = _gen(bits)
    for group, k in ((32, 384), (64, 576), (128, 384), (16, 208), (96, 384), (8, 72), (64, 2752), (96, 3456)):
        n = 23
        codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
        scale = torch.randint(1, 4, (n, k // group), generator=g).float()
        zero = torch.randint(-9, 10, (n, k // group), generator=g).float()
        qw = QuantizedWeight(pack_weight_codes(codes, bits), scale, zero, bits, group, k)
        w = codes.float() * scale.repeat_interleave(group, 1) + zero.repeat_interleave(group, 1)
        for m in range(1, 7):
            x = torch.randint(-3, 4, (m, k), generator=g).float()
            want = (x.double() @ w.double().T).float()
            for isa in each_isa:
                cpp._C.set_lowbit_isa(isa)
                y = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, group, None)
                assert torch.equal(y, want), (isa, group, m)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_fp32_fused_rows_keep_tiny_rows_exact(each_isa, bits):
    # Up to three rows the fused path reads activations scaled by down to 2^-21 (codes masked in
    # place): rows below 2^-64 are raised first, else their values turn subnormal (a row of 1e-37
    # lost 0.4% at 3 bits). Each row must keep the fp32 promise, a tiny row beside a normal one too.
    g = _gen(bits + 40)
    qw = quantize_weight(torch.randn(31, 576, generator=g), bits, 64)
    w64 = ref.dequantize_weight(qw.qweight, qw.scale.double(), qw.zero.double(), bits, 64, 576)
    magnitudes = torch.tensor([1e-37, 1.0, 1e-35])[:, None]  # (smaller ones give subnormal outputs)
    for isa in each_isa:
        cpp._C.set_lowbit_isa(isa)
        for m in (1, 2, 3):
            x = torch.randn(m, 576, generator=g) * magnitudes[:m]
            y = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, 64, None)
            want = x.double() @ w64.T
            row_err = ((y.double() - want).norm(dim=1) / want.norm(dim=1)).max()
            assert row_err <= 1e-5, (isa, m)


@pytest.mark.parametrize("bits", (3, 4))
def test_lowbit_linear_blas_path_by_instruction_set(each_isa, monkeypatch, bits):
    # From BLAS_MIN_ROWS rows on: below AVX-512 (generic, avx2) every activation dtype goes to
    # torch's fp32 matmul on W dequantised to fp32 block by block of rows; on AVX-512 only bf16
    # activations the bf16 kernels do not take go there, to torch's bf16 matmul on W in bf16;
    # the rest stay on the kernels. The same sizes below BLAS_MIN_ROWS never go there.
    monkeypatch.setattr(cpp, "BLAS_MIN_ROWS", 8)
    monkeypatch.setattr(cpp, "_BF16_BLAS_MIN_ROWS", 8)
    monkeypatch.setattr(cpp, "_DEQUANT_BLOCK_BYTES", 40 * 256 * 4)  # three blocks of 34 rows,
    monkeypatch.setattr(cpp, "_DEQUANT_BLOCK_ALIGN", 8)  # rounded up to 40: a short last one
    blas = cpp._dequant_matmul
    for isa in each_isa:
        cpp._C.set_lowbit_isa(isa)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x, qw, b = _lowbit_case(100, 256, 9, bits, 128, dtype, bias=True, seed=bits, lead=(2,))
            calls = []
            monkeypatch.setattr(cpp, "_dequant_matmul", lambda *a, calls=calls: calls.append(a[-1]) or blas(*a))
            y = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, 128, b)
            assert y.shape == (2, 9, 100) and y.dtype == dtype
            if isa in ("generic", "avx2"):
                want = [torch.float32]
            elif dtype == torch.bfloat16 and not cpp._C.lowbit_bf16_kernel(cpp.DTYPE_CODE[torch.bfloat16], bits, 128):
                want = [torch.bfloat16]
            else:
                want = []
            assert calls == want, (isa, dtype)
            tol = 4e-3 if want == [torch.bfloat16] else TOL[dtype]  # bf16 BLAS: W rounded to bf16
            assert _rel_err(y, _lowbit_want64(x, qw, b)) <= tol, (isa, dtype)
            cpp.lowbit_linear(x[:, :3], qw.qweight, qw.scale, qw.zero, bits, 128, b)  # 6 rows
            assert calls == want, (isa, dtype)


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 128), (3, 64), (4, 128), (8, 32), (4, 3)])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_lowbit_dequantize_matches_reference(bits, group, dtype):
    k = group * 3
    qw = quantize_weight(torch.randn(7, k, generator=_gen(bits * 100 + group)), bits, group)
    want = ref.dequantize_weight(qw.qweight, qw.scale, qw.zero, bits, group, k)
    out = torch.empty(7, k, dtype=dtype)
    cpp._C.lowbit_dequantize(qw.qweight.data_ptr(), 7, qw.qweight.shape[1], k, qw.scale.data_ptr(),
                             qw.zero.data_ptr(), 0, bits, group, out.data_ptr(), 0 if dtype == torch.float32 else 2)
    # One FMA instead of a rounded product and sum: within an fp32 ulp of the reference values,
    # which can move a value across a bf16 rounding boundary: one bf16 ulp (up to 2^-7 relative).
    torch.testing.assert_close(out, want.to(dtype), rtol=2 ** -22 if dtype == torch.float32 else 2 ** -7, atol=1e-6)


@pytest.mark.parametrize("bits,group,k", [(2, 64, 576), (3, 32, 384), (4, 128, 1536), (4, 64, 576), (8, 32, 320)])
@pytest.mark.parametrize("scale_dtype", (torch.float32, torch.bfloat16))
def test_lowbit_dequantize_bf16_on_amx_is_the_scaled_panels_weight(amx_isa, bits, group, k, scale_dtype):
    """On AMX CPUs bf16 dequantisation (the large-M path to torch's bf16 matmul) gives exactly the
    weight the tiles' scaled form multiplies: fma(q, scale, zero) in fp32, rounded to nearest even
    bf16; 70 rows (a short last panel) on one thread and on three, the output poisoned first."""
    qw = quantize_weight(torch.randn(70, k, generator=_gen(bits + k)), bits, group, dtype=scale_dtype)
    exact = ref.dequantize_weight(qw.qweight, qw.scale.double(), qw.zero.double(), bits, group, k)
    want = exact.float().bfloat16()  # the fp64 value of q * s + z is exact: rounded once to fp32, as an FMA
    code = cpp.DTYPE_CODE[scale_dtype]
    with _thread_settings():
        for threads in (1, 3):
            cpp._C.set_num_threads(threads)
            out = torch.full((70, k), float("nan"), dtype=torch.bfloat16)
            cpp._C.lowbit_dequantize(qw.qweight.data_ptr(), 70, qw.qweight.shape[1], k, qw.scale.data_ptr(),
                                     qw.zero.data_ptr(), code, bits, group, out.data_ptr(), cpp.DTYPE_CODE[torch.bfloat16])
            assert torch.equal(out, want), threads


@contextlib.contextmanager
def _thread_settings():
    """Restores, on the way out, the kernels' threads, their pool's spin and torch's threads (which
    ``_C.set_num_threads`` also sets, for this Python thread's OpenMP team)."""
    threads, spin, torch_threads = cpp._C.num_threads(), cpp._C.spin_us(), torch.get_num_threads()
    try:
        yield
    finally:
        cpp._C.set_num_threads(threads)
        cpp._C.set_spin_us(spin)
        torch.set_num_threads(torch_threads)


@pytest.mark.parametrize("team", ["openmp", "pool"])
@pytest.mark.parametrize("n, m, dtype", [(300, 3, torch.float32), (576, 520, torch.bfloat16)])
def test_parallel_calls_run_on_torch_openmp_team_or_the_pool(team, n, m, dtype):
    """From a thread whose OpenMP team (torch's: torch.set_num_threads) has more than one thread, a
    parallel kernel runs on that team; with torch at one thread, on the worker pool. Same result as
    one thread (at M = 520 the bf16 activations are also prepared in parallel, 256 rows a chunk)."""
    if team == "openmp" and not cpp._C.team_stats()["openmp"]:
        pytest.skip("the extension was built without OpenMP: every parallel call runs on the pool")
    if dtype == torch.bfloat16:
        # Elsewhere bf16 at M = 520 goes to torch's matmul, whose rounding may follow its threads.
        _needs_bf16_kernels()
    x, qw, _ = _lowbit_case(n, 256, m, 4, 128, dtype, bias=False, seed=3)
    with _thread_settings():
        cpp._C.set_num_threads(1)
        want = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 4, 128, None)
        cpp._C.set_num_threads(3)
        torch.set_num_threads(3 if team == "openmp" else 1)
        before = cpp._C.team_stats()
        for _ in range(3):
            assert torch.equal(cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 4, 128, None), want)
        after = cpp._C.team_stats()
    used, unused = ("team_calls", "pool_calls") if team == "openmp" else ("pool_calls", "team_calls")
    assert after[used] >= before[used] + 3 and after[unused] == before[unused]


@pytest.mark.parametrize("team", ["openmp", "pool"])
@pytest.mark.parametrize("threads", [2, 3, 5, 8])
@pytest.mark.parametrize("n, m", [(32, 1), (300, 3), (1000, 64), (4096, 1)])
def test_parallel_chunks_cover_every_row_on_any_thread_count(team, threads, n, m):
    """parallel_for splits the chunks into one home range per thread (threads take the others'
    chunks once theirs are done): with one chunk, fewer chunks than threads and counts the threads do
    not divide, on the OpenMP team and on the pool, the ranges cover every row of a NaN-poisoned
    output, each with one thread's result."""
    if team == "openmp" and not cpp._C.team_stats()["openmp"]:
        pytest.skip("the extension was built without OpenMP: every parallel call runs on the pool")
    k = 256
    x, qw, _ = _lowbit_case(n, k, m, 4, 128, torch.float32, bias=False, seed=n + threads)
    code = cpp.DTYPE_CODE[torch.float32]

    def run(y):
        cpp._C.lowbit_linear(x.data_ptr(), code, m, k, qw.qweight.data_ptr(), n, qw.qweight.shape[1],
                             qw.scale.data_ptr(), qw.zero.data_ptr(), code, 4, 128, 0, y.data_ptr(), False)
        return y

    with _thread_settings():
        cpp._C.set_num_threads(1)
        want = run(torch.full((m, n), float("nan")))
        cpp._C.set_num_threads(threads)
        torch.set_num_threads(threads if team == "openmp" else 1)
        for _ in range(3):
            assert torch.equal(run(torch.full((m, n), float("nan"))), want)
    assert not want.isnan().any()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kernels_finish_in_a_child_forked_after_the_openmp_team_ran():
    """GNU OpenMP cannot start a region in a child forked from a process whose team ran (torch's own
    parallel ops hang there); the kernels then use the pool, which waits only for claimed chunks."""
    import signal
    import time

    x, qw, _ = _lowbit_case(300, 256, 3, 4, 128, torch.float32, bias=False, seed=4)
    with _thread_settings():
        cpp._C.set_num_threads(2)
        torch.set_num_threads(2)
        want = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 4, 128, None)
        pid = os.fork()
        if pid == 0:  # the child: exit status 0 only for the right result, off the team
            ok = False
            try:
                team = cpp._C.team_stats()["team_calls"]
                got = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 4, 128, None)
                ok = torch.equal(got, want) and cpp._C.team_stats()["team_calls"] == team
            finally:
                os._exit(0 if ok else 1)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the kernel call in the forked child did not finish within 60 s")
            time.sleep(0.02)
        assert os.waitstatus_to_exitcode(done[1]) == 0


def test_worker_pool_spin_setting_keeps_results_and_workers_go_back_to_sleep():
    import time

    x, qw, _ = _lowbit_case(300, 256, 3, 4, 128, torch.float32, bias=False, seed=2)
    want = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 4, 128, None)
    with _thread_settings():
        cpp._C.set_num_threads(3)
        torch.set_num_threads(1)  # the calls run on the pool, not on torch's OpenMP team
        cpp._C.set_spin_us(-1)
        assert cpp._C.spin_us() == 0
        cpp._C.set_spin_us(1 << 30)
        assert cpp._C.spin_us() == 10000
        # Workers between spinning and sleeping while jobs come back to back and after pauses.
        for i, us in enumerate((0, 10000, 50, 0, 200, 10000, 1) * 3):
            cpp._C.set_spin_us(us)
            if i % 3 == 0:
                time.sleep(0.002)
            assert torch.equal(cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 4, 128, None), want)
        # The spin is bounded: idle workers stop using the CPU (10 ms spin, 300 ms idle, 2 workers).
        cpu0 = time.process_time()
        time.sleep(0.3)
        assert time.process_time() - cpu0 < 0.1


def test_worker_pool_spins_by_default_unless_the_environment_says_otherwise(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SPLITKERNELS_SPIN_US"}
    for value, want in ((None, 100), ("0", 0), ("99999", 10000)):
        if value is not None:
            env["SPLITKERNELS_SPIN_US"] = value
        got = subprocess.run([sys.executable, "-c", "import splitkernels._C as C; print(C.spin_us())"], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True).stdout
        assert int(got) == want, value


def test_worker_pool_stops_spinning_while_other_processes_hold_the_cores():
    """A spinning worker that finds its core taken (one busy process per CPU) pauses the spin."""
    import time

    x, qw, _ = _lowbit_case(300, 256, 3, 4, 128, torch.float32, bias=False, seed=3)
    want = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 4, 128, None)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in os.sched_getaffinity(0)]
    try:
        with _thread_settings():
            cpp._C.set_num_threads(2)
            torch.set_num_threads(1)  # the calls run on the pool
            cpp._C.set_spin_us(10000)  # longer than a time slice: the busy processes must take the core
            before = cpp._C.team_stats()["spin_backoffs"]
            deadline = time.monotonic() + 60
            while cpp._C.team_stats()["spin_backoffs"] == before and time.monotonic() < deadline:
                assert torch.equal(cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 4, 128, None), want)
                time.sleep(0.005)
            assert cpp._C.team_stats()["spin_backoffs"] > before
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()


def test_worker_pool_threads_and_concurrent_callers():
    import threading

    x, qw, _ = _lowbit_case(300, 256, 3, 4, 128, torch.float32, bias=False, seed=1)
    want = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 4, 128, None)
    with _thread_settings():
        for threads in (1, 3):
            cpp._C.set_num_threads(threads)
            assert cpp._C.num_threads() == threads
            assert torch.equal(cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 4, 128, None), want)
        # Callers on other Python threads while a call runs (on the pool, or on their own OpenMP
        # team) run inline: same result.
        results = [None] * 4

        def call(i):
            results[i] = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 4, 128, None)

        workers = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        assert all(torch.equal(r, want) for r in results)
