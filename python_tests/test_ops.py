"""Public ops: bit streams against a bit-by-bit model, weight quantisation, matmul references,
torch.library registration (opcheck) and argument errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import splitkernels
from splitkernels import ops
from splitkernels.quant import QuantizedWeight, quantize_weight, quantize_weight_int8


def stream_model(codes: list[int], bits: int) -> list[int]:
    """The bit stream of docs/FORMATS.md, one bit at a time."""
    stream = [(c >> j) & 1 for c in codes for j in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return [sum(stream[i + j] << j for j in range(8)) for i in range(0, len(stream), 8)]


@settings(max_examples=80, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 75), rows=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_pack_matches_bit_model(cpu_backend_names, bits, n, rows, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, n), generator=g, dtype=torch.uint8)
    for name in cpu_backend_names:
        with splitkernels.use_backend(name):
            packed = ops.pack_bits(codes, bits)
            assert packed.tolist() == [stream_model(r, bits) for r in codes.tolist()], name
            assert torch.equal(ops.unpack_bits(packed, bits, n), codes), name


def test_pack_keeps_leading_dims(backend):
    codes = torch.randint(0, 8, (2, 3, 11), dtype=torch.uint8)
    packed = ops.pack_bits(codes, 3)
    assert packed.shape == (2, 3, 5)
    assert torch.equal(ops.unpack_bits(packed, 3, 11), codes)


def test_pack_errors():
    with pytest.raises(TypeError, match="codes must have dtype"):
        ops.pack_bits(torch.zeros(4, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="bits must be one of"):
        ops.pack_bits(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="codes must be < 2\\*\\*bits"):
        ops.pack_bits(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="packed has 1 bytes"):
        ops.unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, 5)
    with pytest.raises(ValueError, match="n must be"):
        ops.unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, -1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [8, 24, 48])
def test_quantize_weight_reconstruction(bits, group_size):
    w = torch.randn(5, 48)
    q = quantize_weight(w, bits, group_size)
    assert q.qweight.shape == (5, (48 * bits + 31) // 32) and q.scale.shape == (5, 48 // group_size)
    wq = q.dequantize()
    # Max error per entry is half a step of its group.
    half_step = (q.scale / 2).repeat_interleave(group_size, dim=1)
    assert ((wq - w).abs() <= half_step * (1 + 1e-5) + 1e-7).all()


def test_clip_search_never_worse_and_helps_at_low_bits():
    w = torch.randn(64, 128)
    w[:, ::37] *= 8  # heavy-tailed groups where clipping pays
    plain = (quantize_weight(w, 2, 64).dequantize() - w).norm()
    clipped = (quantize_weight(w, 2, 64, clip_search=True).dequantize() - w).norm()
    assert clipped < plain


def test_quantize_weight_dtype_and_state_dict_round_trip():
    w = torch.randn(8, 64)
    q = quantize_weight(w, 4, 32, dtype=torch.float16)
    assert q.scale.dtype == torch.float16 and q.zero.dtype == torch.float16
    back = QuantizedWeight.from_state_dict(q.state_dict())
    assert torch.equal(back.dequantize(), q.dequantize())
    bad = dict(q.state_dict(), format_version=torch.tensor(99))
    with pytest.raises(ValueError, match="format_version 99"):
        QuantizedWeight.from_state_dict(bad)


def test_quantize_weight_errors():
    w = torch.randn(4, 48)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_weight(w, 5, 16)
    with pytest.raises(ValueError, match="group_size must divide K = 48"):
        quantize_weight(w, 4, 32)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        quantize_weight(w, 4, 0)
    with pytest.raises(TypeError, match="w must have dtype"):
        quantize_weight(w.to(torch.int32), 4, 16)
    with pytest.raises(ValueError, match="w must be 2-D"):
        quantize_weight(w[0], 4, 16)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        quantize_weight(w, 4, 16)


def rel_err(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_lowbit_linear_against_float64(backend, bits, m, dtype, tol):
    k, n = 96, 40
    w = torch.randn(n, k)
    q = quantize_weight(w, bits, 32, dtype=dtype)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    ref = x.double() @ q.dequantize(torch.float64).T + bias.double()
    out = ops.lowbit_linear(x, q, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, ref) <= tol


def test_lowbit_linear_batched_shape_and_errors(backend):
    q = quantize_weight(torch.randn(16, 64), 4, 32)
    x = torch.randn(2, 3, 64)
    assert ops.lowbit_linear(x, q).shape == (2, 3, 16)
    with pytest.raises(ValueError, match="in_features = 64"):
        ops.lowbit_linear(torch.randn(2, 63), q)
    with pytest.raises(TypeError, match="qweight must be a QuantizedWeight"):
        ops.lowbit_linear(x, q.dequantize())
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.lowbit_linear(x.to(torch.int64), q)
    with pytest.raises(ValueError, match="bias must have 16"):
        ops.lowbit_linear(x, q, torch.randn(15))


def test_lowbit_linear_rejects_bad_layouts_before_any_kernel(backend):
    q = quantize_weight(torch.randn(16, 64), 3, 32)
    x = torch.randn(2, 64)
    cases = [
        (dict(qweight=q.qweight[:, :-1]), ValueError, "qweight must have 6 words per row"),
        (dict(qweight=q.qweight.float()), TypeError, "qweight must be a 2-D int32"),
        (dict(scale=q.scale[:, :1]), ValueError, "scale must have shape \\(16, 2\\)"),
        (dict(zero=q.zero.half()), TypeError, "zero must have the dtype of scale"),
        (dict(group_size=24), ValueError, "group_size must be a positive divisor of in_features = 64"),
        (dict(bits=5), ValueError, "bits must be one of"),
    ]
    for change, error, message in cases:
        fields = {**q.__dict__, **change}
        with pytest.raises(error, match=message):
            ops.lowbit_linear(x, QuantizedWeight(**fields))


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_linear_is_exact_integer_arithmetic(backend, m, dtype):
    k, n = 70, 24
    w = torch.randn(n, k)
    wq, ws = quantize_weight_int8(w)
    x = torch.randn(m, k).to(dtype)
    x[0] = 0.0 if m > 1 else x[0]  # an all-zero token must not divide by zero
    xq, xs = ops.reference.quantize_rows_int8(x)
    acc = [[sum(int(a) * int(b) for a, b in zip(xr, wr)) for wr in wq.tolist()] for xr in xq.tolist()]
    expected = (torch.tensor(acc, dtype=torch.float32) * xs[:, None] * ws).to(dtype)
    out = ops.int8_linear(x, wq, ws)
    assert rel_err(out, expected.double()) <= (1e-6 if dtype == torch.float32 else 1e-2)
    assert torch.isfinite(out).all()


def test_int8_linear_errors():
    wq, ws = quantize_weight_int8(torch.randn(4, 8))
    with pytest.raises(TypeError, match="w_int8 must have dtype"):
        ops.int8_linear(torch.randn(1, 8), wq.float(), ws)
    with pytest.raises(ValueError, match="K = 8"):
        ops.int8_linear(torch.randn(1, 9), wq, ws)
    with pytest.raises(ValueError, match="w_scale must have 4"):
        ops.int8_linear(torch.randn(1, 8), wq, ws[:3])


def test_opcheck_on_every_op():
    codes = torch.randint(0, 8, (3, 13), dtype=torch.uint8)
    torch.library.opcheck(torch.ops.splitkernels.pack_bits.default, (codes, 3))
    torch.library.opcheck(torch.ops.splitkernels.unpack_bits.default, (ops.pack_bits(codes, 3), 3, 13))
    q = quantize_weight(torch.randn(8, 32), 4, 16)
    x = torch.randn(2, 32)
    torch.library.opcheck(
        torch.ops.splitkernels.lowbit_linear.default, (x, q.qweight, q.scale, q.zero, 4, 16, None)
    )
    wq, ws = quantize_weight_int8(torch.randn(8, 32))
    torch.library.opcheck(torch.ops.splitkernels.int8_linear.default, (x, wq, ws, None))
    h = torch.randn(4, 24)
    args = (h, False, 4.0, 3, [2, 4, 8], 0.05, None)
    torch.library.opcheck(torch.ops.splitkernels.ts_tabq_encode.default, args)
    enc = ops.ts_tabq_encode(*args)
    bits, lo, step, _hi, cnt, idx, val, codes8, _nbytes = enc
    torch.library.opcheck(torch.ops.splitkernels.ts_tabq_decode.default, (bits, lo, step, cnt, idx, val, codes8, 24))


def test_ops_trace_under_torch_compile():
    q = quantize_weight(torch.randn(8, 32), 4, 16)

    @torch.compile(backend="eager", fullgraph=True)
    def f(x):
        return torch.ops.splitkernels.lowbit_linear(x, q.qweight, q.scale, q.zero, 4, 16, None) * 2

    x = torch.randn(3, 32)
    assert torch.allclose(f(x), ops.lowbit_linear(x, q) * 2)


def test_backend_registry_reports_and_selects():
    info = splitkernels.backends()
    assert set(info) == {"reference", "cpp", "triton", "cuda"}
    assert info["reference"]["available"]
    for name, b in info.items():
        assert b["available"] or b["reason"], name
    with pytest.raises(ValueError, match="backend must be one of"):
        with splitkernels.use_backend("fastest"):
            pass
    for name, b in info.items():
        if not b["available"]:
            with pytest.raises(RuntimeError, match=f"backend '{name}' is not available"):
                with splitkernels.use_backend(name):
                    pass
    with splitkernels.use_backend("reference"):
        assert splitkernels.current_backend() == "reference"
    assert splitkernels.current_backend() is None


def test_decode_buffer_errors_name_the_argument():
    x = torch.randn(3, 10)
    bits, lo, step, _hi, cnt, idx, val, codes, _nbytes = ops.ts_tabq_encode(x, False, 2.0, 2, [4], 0.1)
    good = dict(bits=bits, lo=lo, step=step, cnt=cnt, idx=idx, val=val, codes=codes, d=10)
    assert torch.equal(ops.ts_tabq_decode(**good), ops.reference.ts_tabq_decode(**good))
    cases = [
        (dict(bits=bits.int()), TypeError, "bits must have dtype"),
        (dict(lo=lo[:2]), ValueError, "lo must have T = 3"),
        (dict(step=step.float()), TypeError, "step must have dtype"),
        (dict(idx=idx[:, :1]), ValueError, "idx and val"),
        (dict(codes=codes[:, :5]), ValueError, "codes must be"),
        (dict(d=0), ValueError, "d must be a positive int"),
    ]
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            ops.ts_tabq_decode(**{**good, **change})


def test_eager_calls_skip_the_dispatcher_and_traced_calls_keep_it(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls = []
    op = ops._int8_linear
    monkeypatch.setattr(ops, "_int8_linear", lambda *a: calls.append(1) or op(*a))
    w, s = quantize_weight_int8(torch.randn(48, 40))
    x = torch.randn(3, 40)
    eager = ops.int8_linear(x, w, s)
    assert calls == [] and torch.equal(eager, op(x, w, s, None))  # the same kernel without the dispatcher
    graded = ops.int8_linear(x.clone().requires_grad_(), w, s)
    assert calls == [1] and graded.requires_grad  # autograd sees the op
    with torch.no_grad():
        ops.int8_linear(x.clone().requires_grad_(), w, s)
    assert calls == [1]
    with FakeTensorMode() as mode:
        fake = ops.int8_linear(mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(s))
    assert calls == [1, 1] and fake.shape == (3, 48)
    assert ops.int8_linear(x.to("meta"), w.to("meta"), s.to("meta")).shape == (3, 48) and calls == [1, 1, 1]
    # torch.compile traces the public wrapper through the op (its fake kernel).
    compiled = torch.compile(lambda t: ops.int8_linear(t, w, s) * 2, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), eager * 2)
