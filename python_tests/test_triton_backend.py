"""The triton backend against the reference: codec and bit packing bit for bit, matmuls within tolerance.

Without a CUDA device the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``, set by
conftest.py before anything imports Triton unless the environment says otherwise). On a CUDA machine
without that variable every test runs compiled on the GPU; the ``gpu``-marked ones (a compact
cross-check, autotuning, CUDA graph replay) are what ``pytest -m gpu`` picks.
"""
import json
import os
import sys

import torch

import pytest  # noqa: E402
from expect import unavailable  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
try:
    import triton  # noqa: E402
except ImportError as exc:
    unavailable(f"triton does not import ({exc})")
if INTERPRET and "splitkernels.triton.codec_encode" in sys.modules and not hasattr(
    sys.modules["splitkernels.triton.codec_encode"]._encode_kernel, "rewriter"
):
    unavailable("splitkernels.triton was imported before TRITON_INTERPRET=1 was set; export it before pytest starts")
if not INTERPRET and not torch.cuda.is_available():
    unavailable("TRITON_INTERPRET=0 and no CUDA device: the Triton kernels have nowhere to run")

import triton.language as tl  # noqa: E402

import splitkernels  # noqa: E402
from splitkernels import ops, registry  # noqa: E402
from splitkernels.ops import reference as ref  # noqa: E402
from splitkernels.formats import round_down_fp16, round_up_fp16  # noqa: E402
from splitkernels.quant import quantize_weight, quantize_weight_int8  # noqa: E402
from splitkernels.triton import autotune_cache, codec_decode, dispatch, rounding  # noqa: E402
from splitkernels.triton import lowbit_gemm as lg  # noqa: E402

DEVICE = torch.device("cpu" if INTERPRET else "cuda")
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device, TRITON_INTERPRET=0")


pytestmark = pytest.mark.usefixtures("poisoned_empty")  # conftest: torch.empty hands out 0xA5 bytes


def run(backend, fn, *args):
    with splitkernels.use_backend(backend):
        return fn(*args)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """Compare floats by their bytes (-0.0 vs 0.0 and the exact rounding both matter)."""
    return t.view(torch.uint8) if t.dtype.is_floating_point else t


# ---------------------------------------------------------------- registration


def test_backend_registration():
    info = splitkernels.backends()["triton"]
    assert info["available"], info["reason"]
    assert "cuda" in info["devices"]
    assert set(info["ops"]) >= {"pack_bits", "unpack_bits", "lowbit_linear", "ts_tabq_encode", "ts_tabq_decode"}
    triton_kernels = set(registry.get_backend("triton").kernels.values())
    # The interpreter may serve CPU tensors on request, but never by default.
    assert registry.resolve("pack_bits", torch.device("cpu")) not in triton_kernels
    if torch.cuda.is_available():
        assert registry.resolve("pack_bits", torch.device("cuda")) in triton_kernels


# ---------------------------------------------------------------- fp16 directed rounding


@triton.jit
def _rounding_kernel(v_ptr, down_ptr, up_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(v_ptr + offs, mask=offs < n)
    tl.store(down_ptr + offs, rounding.round_down_fp16(v), mask=offs < n)
    tl.store(up_ptr + offs, rounding.round_up_fp16(tl.abs(v)), mask=offs < n)


def test_fp16_directed_rounding_matches_reference():
    g = torch.Generator().manual_seed(1)
    edges = torch.tensor(
        [0.0, -0.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14, 2.0**-14 * (1 - 2**-11), 1.0, 1 + 2**-11,
         1 + 2**-10, 65504.0, 65504.5, 65519.0, 65520.0, 1e6, 3.4e38, 1e-40, 2049.0, 2051.0]
    )
    bits = torch.randint(0, 2**31, (3000,), generator=g, dtype=torch.int64) & 0x7F7FFFFF  # finite only
    rnd = bits.to(torch.int32).view(torch.float32)
    v = torch.cat([edges, -edges, rnd, -rnd, torch.randn(500, generator=g) * 1e-6]).to(DEVICE)
    down, up = torch.empty_like(v), torch.empty_like(v)
    _rounding_kernel[(1,)](v, down, up, v.numel(), BLOCK=triton.next_power_of_2(v.numel()))
    assert torch.equal(bits_of(down), bits_of(round_down_fp16(v)))
    assert torch.equal(bits_of(up), bits_of(round_up_fp16(v.abs())))


# ---------------------------------------------------------------- bit packing


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_bit_exact(bits):
    g = torch.Generator().manual_seed(bits)
    for shape in [(3, 1), (2, 13), (3, 100), (2, 2, 31), (0, 9), (4, 0)]:
        codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.uint8).to(DEVICE)
        packed = run("triton", ops.pack_bits, codes, bits)
        expect = ref.pack_bits(codes, bits)
        assert torch.equal(packed, expect), shape
        assert torch.equal(run("triton", ops.unpack_bits, expect, bits, shape[-1]), codes), shape
    # A stream wider than needed (trailing bytes ignored) unpacks the same.
    codes = torch.randint(0, 2**bits, (4, 5), generator=g, dtype=torch.uint8).to(DEVICE)
    wide = torch.cat([ref.pack_bits(codes, bits), torch.full((4, 3), 0xFF, dtype=torch.uint8, device=DEVICE)], 1)
    assert torch.equal(run("triton", ops.unpack_bits, wide, bits, 5), codes)


# ---------------------------------------------------------------- TS + TAB-Q codec

ENCODE_NAMES = ("bits", "lo", "step", "hi", "cnt", "idx", "val", "codes", "nbytes")


def activations(t: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows with heavy channels and a massive first token, as in real LLM activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g)
    x[:, torch.randperm(d, generator=g)[: max(1, d // 16)]] *= 25.0
    x[0] *= 60.0
    return x.to(dtype).to(DEVICE)


def check_codec(x, abs_threshold, threshold, capacity, menu, eps, forced=None):
    args = (x, abs_threshold, threshold, capacity, menu, eps, forced)
    got = run("triton", ops.ts_tabq_encode, *args)
    want = ref.ts_tabq_encode(*args)
    for name, a, b in zip(ENCODE_NAMES, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(bits_of(a), bits_of(b)), name
    buffers = [want[i] for i in (0, 1, 2, 4, 5, 6, 7)]
    decoded = run("triton", ops.ts_tabq_decode, *buffers, x.shape[1])
    assert torch.equal(bits_of(decoded), bits_of(ref.ts_tabq_decode(*buffers, x.shape[1])))
    return want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_codec_random_mixed_widths(dtype):
    x = activations(12, 37, dtype, seed=3)
    x[5] = 1.25  # a constant row: step 0
    seen = set()
    for eps in (0.3, 0.04, 0.005, 1e-4):
        seen |= set(check_codec(x, False, 2.5, 3, [2, 3, 4, 8], eps)[0].tolist())
    assert len(seen) >= 4, seen  # the sweep exercised several widths and raw rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_codec_edge_cases(dtype):
    x = activations(5, 33, dtype, seed=4)
    check_codec(x[:1], False, 2.0, 2, [4], 0.02)  # T = 1
    check_codec(x, False, 2.0, 0, [3, 8], 0.05)  # capacity 0
    check_codec(x, False, 1.0, 33, [2, 4], 0.05)  # capacity = d
    check_codec(x, True, 0.0, 33, [4], 0.05)  # every channel an outlier: no inliers
    check_codec(x, True, 0.0, 5, [1, 5, 6, 7], 0.2)  # over capacity, odd widths
    check_codec(x, False, 2.0, 3, [], 0.1)  # empty menu: all raw
    check_codec(x[:0], False, 2.0, 3, [4], 0.1)  # T = 0
    check_codec(torch.full((3, 16), -0.0, dtype=dtype, device=DEVICE), False, 2.0, 2, [2], 0.1)


def test_codec_ties_go_to_the_lower_channel():
    x = torch.tensor([[0.1, 5.0, -5.0, 0.2, 5.0, -0.3, -5.0, 0.0, 0.4], [3.0, -3.0, 3.0, 1.0, -3.0, 0.5, 0.2, 0.1, 3.0]])
    want = check_codec(x.to(DEVICE), True, 1.0, 3, [4], 0.1)
    assert want[5].tolist() == [[1, 2, 4], [0, 1, 2]]
    # Equal magnitudes with 7 surplus candidates (dropped one by one) and 15 (radix select).
    g = torch.Generator().manual_seed(14)
    y = torch.randn(2, 40, generator=g) * 0.1
    for r, n in enumerate((12, 20)):
        y[r, torch.randperm(40, generator=g)[:n]] = 7.0 * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)
    y[1, 3] = 9.0  # one larger value ranks first
    want = check_codec(y.to(DEVICE), True, 1.0, 5, [4], 0.1)
    assert (want[4] == 5).all()


def test_codec_forced_bits():
    x = activations(7, 40, torch.float32, seed=5)
    x[3, 7] = -1e6  # an inlier below the fp16 range (capacity 0): lo = -inf, so raw at any width
    forced = torch.tensor([1, 2, 3, 8, 5, 32, 4], dtype=torch.uint8, device=DEVICE)
    check_codec(x, False, 2.0, 0, [4], 0.1, forced)
    want = check_codec(x.half(), False, 2.0, 2, [4], 0.1, torch.tensor([3, 16, 8, 4, 1, 7, 6], dtype=torch.uint8, device=DEVICE))
    assert want[0].tolist()[:2] == [3, 16]
    assert ref.ts_tabq_encode(x, False, 2.0, 0, [4], 0.1, forced)[0][3].item() == 32


def test_decode_never_writes_outside_its_row():
    x = activations(3, 24, torch.float16, seed=15)
    enc = ref.ts_tabq_encode(x, False, 1.0, 4, [3], 0.1, None)
    bits, lo, step, _, cnt, idx, val, codes, _ = enc
    bad = idx.clone()
    bad[:, -1] = torch.tensor([24, -1, 1 << 20], dtype=torch.int32)  # out of range in every last used slot
    got = codec_decode.ts_tabq_decode(bits, lo, step, torch.full_like(cnt, 4), bad, val, codes, 24)
    want = ref.ts_tabq_decode(bits, lo, step, torch.full_like(cnt, 3), idx, val, codes, 24)
    assert torch.equal(bits_of(got), bits_of(want))


def test_codec_larger_row_with_overflowing_candidates():
    x = activations(3, 300, torch.float16, seed=6)
    want = check_codec(x, False, 1.5, 4, [2, 3, 4, 8], 0.02)
    assert (want[4] == 4).all()  # every row had more candidates than capacity


# ---------------------------------------------------------------- low-bit matmul


def tolerance(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-3


def rel_err(y, r):
    return ((y.float() - r.float()).norm() / r.float().norm()).item()


def weight(n, k, bits, group, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize_weight(torch.randn(n, k, generator=g).to(DEVICE), bits, group, dtype=dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lowbit_linear_paths(bits, dtype):
    group = {2: 32, 3: 64, 4: 128, 8: 32}[bits]
    qw = weight(40, 128 if group != 64 else 192, bits, group, dtype, seed=bits)
    g = torch.Generator().manual_seed(7)
    bias = torch.randn(40, generator=g).to(dtype).to(DEVICE)
    for m in (1, 3, 70):
        x = torch.randn(m, qw.in_features, generator=g).to(dtype).to(DEVICE)
        want = ref.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, group, bias)
        got = run("triton", ops.lowbit_linear, x, qw, bias)
        assert got.dtype == dtype and got.shape == want.shape
        assert rel_err(got, want) < tolerance(dtype), m


@pytest.mark.parametrize("kernel,config", [
    ("gemv", lg.GEMV_CONFIGS[3]), ("gemv", lg.GEMV_CONFIGS[1]), ("tiled", lg.TILED_CONFIGS[4]), ("tiled", lg.TILED_CONFIGS[2]),
])
def test_lowbit_kernels_split_k_and_odd_groups(kernel, config):
    fn = lg.gemv if kernel == "gemv" else lg.tiled
    g = torch.Generator().manual_seed(8)
    # Word tiles (4/96, 2/64) and the per-code path (3 bits; 2 bits with groups of 24 splitting words).
    for bits, group, k in ((3, 48, 144), (4, 96, 96), (2, 64, 320), (2, 24, 72)):
        qw = weight(24, k, bits, group, torch.float16, seed=k)
        x = torch.randn(5, k, generator=g).half().to(DEVICE)
        bias = torch.randn(24, generator=g).half().to(DEVICE)
        for b in (None, bias):
            want = ref.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, group, b)
            assert rel_err(fn(x, qw.qweight, qw.scale, qw.zero, bits, group, b, config), want) < 1e-3


def test_lowbit_linear_batched_input_and_fp32_scales():
    qw = weight(16, 64, 4, 32, torch.float32)
    x = torch.randn(2, 3, 64).half().to(DEVICE)
    got = run("triton", ops.lowbit_linear, x, qw)  # scales cast to fp16 by the Triton backend
    want = ref.lowbit_linear(x, qw.qweight, qw.scale.half(), qw.zero.half(), 4, 32, None)
    assert got.shape == (2, 3, 16) and rel_err(got, want) < 1e-3
    assert run("triton", ops.lowbit_linear, x[:, :0], qw).shape == (2, 0, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_linear_matches_reference(dtype):
    g = torch.Generator().manual_seed(11)
    wq, ws = quantize_weight_int8(torch.randn(24, 70, generator=g).to(DEVICE))
    bias = torch.randn(24, generator=g).to(dtype).to(DEVICE)
    for m in (1, 5):
        x = (torch.randn(m, 70, generator=g) * 3).to(dtype).to(DEVICE)
        x[-1, :3] = torch.tensor([1.5, -2.5, 0.5]).to(dtype) * x[-1].float().abs().max().to(dtype) / 127  # ties
        if m > 1:
            x[0] = 0.0  # an all-zero token
        for b in (None, bias):
            want = ref.int8_linear(x, wq, ws, b)
            got = run("triton", ops.int8_linear, x, wq, ws, b)
            assert got.dtype == dtype and rel_err(got, want) < tolerance(dtype) / 10


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_kernel_bit_exact(bits):
    qw = weight(20, 192, bits, 64, torch.float32, seed=bits)
    w = lg.dequantize(qw.qweight, qw.scale, qw.zero, bits, 64, 192, torch.float32)
    assert torch.equal(w, ref.dequantize_weight(qw.qweight, qw.scale, qw.zero, bits, 64, 192))


def test_dequant_cache_hits_invalidates_and_admits_within_budget():
    size = 16 * 64 * 2
    cache = lg.DequantCache(budget_bytes=2 * size)
    a, b, c = (weight(16, 64, 4, 32, torch.float16, seed=s) for s in range(3))
    args = lambda q: (q.qweight, q.scale, q.zero, 4, 32, 64, torch.float16)  # noqa: E731
    wa = cache.get(*args(a))
    assert cache.get(*args(a)) is wa and cache.nbytes == size
    assert torch.equal(wa, a.dequantize(torch.float16))
    a.qweight[0, 0] ^= 0x0F  # in-place change of the packed codes
    wa2 = cache.get(*args(a))
    assert wa2 is not wa and torch.equal(wa2, a.dequantize(torch.float16)) and cache.nbytes == size
    assert cache.get(*args(b)) is cache.get(*args(b))
    wc = cache.get(*args(c))  # over budget: computed, not cached, nothing evicted
    assert cache.get(*args(c)) is not wc and cache.get(*args(a)) is wa2 and cache.nbytes == 2 * size
    del b  # freed with its packed weight, which makes room for c
    assert cache.nbytes == size
    assert cache.get(*args(c)) is cache.get(*args(c)) and cache.nbytes == 2 * size
    # A different scale object (e.g. cast per call) is never served from the entry of another.
    assert cache.get(a.qweight, a.scale.clone(), a.zero, 4, 32, 64, torch.float16) is not wa2


def test_dispatch_table(monkeypatch, tmp_path):
    cpu = torch.device("cpu")
    assert dispatch.choose_path(1, 4, torch.float16, cpu) == "gemv"
    assert dispatch.choose_path(16, 4, torch.float16, cpu) == "tiled"
    assert dispatch.choose_path(4096, 4, torch.float16, cpu) == "dequant"
    assert dispatch.choose_path(4096, 4, torch.bfloat16, cpu) == "tiled"
    override = {"version": 1, "gpus": {"default": {b: {"gemv_max_m": 4, "tiled_max_m": 8} for b in "2348"}}}
    (tmp_path / "t.json").write_text(json.dumps(override))
    monkeypatch.setenv("SPLITKERNELS_DISPATCH_TABLE", str(tmp_path / "t.json"))
    dispatch.table.cache_clear()
    try:
        assert [dispatch.choose_path(m, 3, torch.float16, cpu) for m in (4, 5, 9)] == ["gemv", "tiled", "dequant"]
        (tmp_path / "t.json").write_text(json.dumps({"version": 99, "gpus": {}}))
        dispatch.table.cache_clear()
        with pytest.raises(ValueError, match="version"):
            dispatch.table()
    finally:
        monkeypatch.delenv("SPLITKERNELS_DISPATCH_TABLE")
        dispatch.table.cache_clear()


def test_autotune_cache_uses_stored_configs(monkeypatch, tmp_path):
    monkeypatch.setenv("SPLITKERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(autotune_cache, "_cache", None)
    calls = []
    cands = [{"a": 1}, {"a": 2}]
    cpu = torch.device("cpu")
    assert not autotune_cache.tuning_enabled(cpu)
    assert autotune_cache.pick("k", "key", cands, calls.append, cpu) == {"a": 1} and calls == []
    (tmp_path / "triton_autotune.json").write_text(json.dumps({"cpu": {"k/key": {"a": 2}}}))
    monkeypatch.setattr(autotune_cache, "_cache", None)
    assert autotune_cache.pick("k", "key", cands, calls.append, cpu) == {"a": 2}


def test_shipped_configs_fill_in_for_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPLITKERNELS_CACHE", str(tmp_path / "home"))
    monkeypatch.setattr(autotune_cache, "_cache", None)
    monkeypatch.setattr(autotune_cache, "shipped_dir", lambda: tmp_path)
    autotune_cache.shipped.cache_clear()
    try:
        (tmp_path / "cpu.json").write_text(json.dumps({"version": 1, "gpu": "cpu", "configs": {"k/key": {"a": 3}}}))
        cands, cpu = [{"a": 1}, {"a": 2}], torch.device("cpu")
        assert autotune_cache.pick("k", "key", cands, None, cpu) == {"a": 3}
        assert autotune_cache.pick("k", "other", cands, None, cpu) == {"a": 1}
        (tmp_path / "home").mkdir()
        (tmp_path / "home" / "triton_autotune.json").write_text(json.dumps({"cpu": {"k/key": {"a": 2}}}))
        monkeypatch.setattr(autotune_cache, "_cache", None)
        assert autotune_cache.pick("k", "key", cands, None, cpu) == {"a": 2}  # the user's own tuning wins
        assert autotune_cache.export("cpu") == {"version": 1, "gpu": "cpu", "configs": {"k/key": {"a": 2}}}
        (tmp_path / "bad.json").write_text(json.dumps({"version": 9, "gpu": "x", "configs": {}}))
        autotune_cache.shipped.cache_clear()
        with pytest.raises(ValueError, match="version"):
            autotune_cache.shipped()
    finally:
        autotune_cache.shipped.cache_clear()


@pytest.mark.slow
def test_kernels_compile_for_sm90_with_exact_rounding():
    """The compiler (not the interpreter) accepts every kernel family; the PTX divides with div.rn."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(splitkernels.__file__)), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "splitkernels.triton.compile_check", "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    from splitkernels.triton.compile_check import variants

    for name, *_ in variants():  # each variant was compiled, none skipped
        assert f"{name}: compiled for sm_90" in proc.stdout, name


# ---------------------------------------------------------------- GPU only


@gpu
@needs_gpu
def test_gpu_cross_check_at_model_sizes():
    """The compiled kernels on real sizes: codec bit for bit, matmuls on every dispatch path."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = activations(64, 4096, dtype, seed=12)
        for eps in (0.06, 0.01):
            check_codec(x, False, 4.0, 16, [2, 3, 4, 5, 6, 8], eps)
    check_codec(activations(8, 1000, torch.float16, seed=13), False, 1.0, 4, [3, 7], 0.1)
    for bits in range(1, 9):
        codes = torch.randint(0, 2**bits, (7, 1001), dtype=torch.uint8, device="cuda")
        assert torch.equal(run("triton", ops.pack_bits, codes, bits), ref.pack_bits(codes, bits))
    for bits, n, k in ((4, 4096, 4096), (3, 1024, 2048), (2, 512, 1024), (8, 512, 1024)):
        for dtype in (torch.float16, torch.bfloat16):
            qw = weight(n, k, bits, 128, dtype, seed=bits)
            # A bf16 output differs from the bf16-rounded reference by its own rounding noise
            # (~1e-3 relative) once the tiled path's tf32 weights move a sum across a rounding
            # boundary: one bf16 ulp (2^-8) is the bound there, 1e-3 for fp16.
            tol = 2**-8 if dtype == torch.bfloat16 else 1e-3
            for m in (1, 16, 300):
                x = torch.randn(m, k, device="cuda").to(dtype)
                want = ref.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, bits, 128, None)
                assert rel_err(run("triton", ops.lowbit_linear, x, qw), want) < tol, (bits, dtype, m)


@gpu
@needs_gpu
def test_autotune_tunes_once_and_persists(monkeypatch, tmp_path):
    monkeypatch.setenv("SPLITKERNELS_CACHE", str(tmp_path))
    monkeypatch.setenv("SPLITKERNELS_AUTOTUNE", "1")
    monkeypatch.setattr(autotune_cache, "_cache", None)
    qw = weight(512, 1024, 4, 128, torch.float16)
    x = torch.randn(1, 1024, device="cuda").half()
    y = run("triton", ops.lowbit_linear, x, qw)
    stored = json.loads((tmp_path / "triton_autotune.json").read_text())
    (entries,) = stored.values()
    assert any(k.startswith("gemv/") for k in entries)
    assert entries[next(k for k in entries if k.startswith("gemv/"))] in lg.GEMV_CONFIGS
    assert rel_err(y, ref.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 4, 128, None)) < 1e-3


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_replay_of_one_token_codec(dtype):
    x = activations(1, 4096, dtype, seed=9)
    args = (False, 3.0, 64, [2, 3, 4, 8], 0.02, None)
    with splitkernels.use_backend("triton"):
        eager = ops.ts_tabq_encode(x, *args)
        eager_dec = ops.ts_tabq_decode(*[eager[i] for i in (0, 1, 2, 4, 5, 6, 7)], 4096)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):  # warm up (compile) outside the capture
            ops.ts_tabq_decode(*[ops.ts_tabq_encode(x, *args)[i] for i in (0, 1, 2, 4, 5, 6, 7)], 4096)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            enc = ops.ts_tabq_encode(x, *args)
            dec = ops.ts_tabq_decode(*[enc[i] for i in (0, 1, 2, 4, 5, 6, 7)], 4096)
        x.copy_(activations(1, 4096, dtype, seed=10))
        graph.replay()
        torch.cuda.synchronize()
    want = ref.ts_tabq_encode(x, *args)
    for name, a, b in zip(ENCODE_NAMES, enc, want):
        assert torch.equal(bits_of(a), bits_of(b)), name
    assert torch.equal(bits_of(dec), bits_of(ref.ts_tabq_decode(*[want[i] for i in (0, 1, 2, 4, 5, 6, 7)], 4096)))
    assert not torch.equal(bits_of(dec), bits_of(eager_dec))  # the replay really used the new input


@pytest.mark.parametrize("offset,pad", [(1, 0), (0, 3), (3, 1)])
def test_decode_raw_rows_are_loaded_aligned(monkeypatch, offset, pad):
    # Offset views and odd row strides must reach the kernel element-aligned (a GPU faults on a
    # misaligned 2-byte load), and decode as the reference does.
    x = activations(4, 40, torch.float16, seed=21)
    bits, lo, step, _, cnt, idx, val, codes, _ = ref.ts_tabq_encode(x, False, 1.0, 2, [3], 0.1, torch.tensor(
        [16, 3, 16, 3], dtype=torch.uint8, device=DEVICE))
    storage = torch.zeros(4 * (codes.shape[1] + pad) + offset, dtype=torch.uint8, device=DEVICE)
    view = storage[offset:].view(4, codes.shape[1] + pad)[:, : codes.shape[1]]
    view.copy_(codes)
    seen = []
    real = codec_decode._decode_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((args[6].data_ptr(), args[10]))
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(codec_decode, "_decode_kernel", Spy())
    got = codec_decode.ts_tabq_decode(bits, lo, step, cnt, idx, val, view, 40)
    ptr, stride = seen[0]
    assert ptr % 2 == 0 and stride % 2 == 0
    assert torch.equal(bits_of(got), bits_of(ref.ts_tabq_decode(bits, lo, step, cnt, idx, val, codes, 40)))
