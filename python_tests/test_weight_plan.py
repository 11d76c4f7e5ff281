"""lowbit_linear's per-weight plans (splitkernels/ops/weight_plan.py): reused while the weight is
unchanged, never stale after a change of the weight, the backend, the instruction set or the
thread count, and every argument error still raised on a weight whose plan is cached."""
import gc

import pytest
import torch

import splitkernels
from splitkernels import ops, registry
from splitkernels.formats import QuantizedWeight
from splitkernels.nn import QuantLinear
from splitkernels.ops import weight_plan as lp
from splitkernels.ops import reference as ref
from splitkernels.quant import quantize_weight

cpp_only = pytest.mark.skipif(not splitkernels.backends()["cpp"]["available"], reason="the C++ extension is not built")


def _weight(n=24, k=64, bits=4, group=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize_weight(torch.randn(n, k, generator=g), bits, group, dtype=dtype)


def _x(m, k, dtype=torch.float32, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _want(x, qw, bias=None):
    """The reference op, run unplanned (it reads the QuantizedWeight's fields as they are now)."""
    return ref.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, qw.bits, qw.group_size, bias)


def _close(out, want, tol=1e-5):
    return out.shape == want.shape and float((out.double() - want.double()).norm() / want.double().norm()) <= tol


@pytest.fixture
def counted(monkeypatch):
    """Counts layout checks and kernel preparations (what a plan saves)."""
    counts = {"check": 0, "prepare": 0}
    check, prepare = QuantizedWeight.check, lp.LinearPlan._prepare

    def counting_check(self):
        counts["check"] += 1
        return check(self)

    def counting_prepare(self):
        counts["prepare"] += 1
        return prepare(self)

    monkeypatch.setattr(QuantizedWeight, "check", counting_check)
    monkeypatch.setattr(lp.LinearPlan, "_prepare", counting_prepare)
    return counts


def test_plan_is_made_once_and_reused(counted):
    qw, x = _weight(), _x(3, 64)
    first = ops.lowbit_linear(x, qw)
    for _ in range(3):
        assert torch.equal(ops.lowbit_linear(x, qw), first)
    assert counted == {"check": 1, "prepare": 1}
    assert _close(first, _want(x, qw))


def test_values_changed_in_place_are_read_on_the_next_call(counted):
    qw, x = _weight(), _x(2, 64)
    ops.lowbit_linear(x, qw)
    other = _weight(seed=5)
    with torch.no_grad():
        for name in ("qweight", "scale", "zero"):
            getattr(qw, name).copy_(getattr(other, name))
    assert _close(ops.lowbit_linear(x, qw), _want(x, other))


def test_assigned_fields_make_a_new_plan_and_bad_ones_still_raise():
    qw, x = _weight(bits=4), _x(2, 64)
    ops.lowbit_linear(x, qw)
    w8 = _weight(bits=8, seed=2)
    qw.qweight, qw.scale, qw.zero, qw.bits = w8.qweight, w8.scale, w8.zero, 8
    assert _close(ops.lowbit_linear(x, qw), _want(x, w8))
    qw.bits = 4  # 8-bit words with bits = 4: the layout check must run again
    with pytest.raises(ValueError, match="qweight must have 8 words per row"):
        ops.lowbit_linear(x, qw)
    qw.bits, qw.scale = 8, w8.scale[:, :1]
    with pytest.raises(ValueError, match="scale must have shape \\(24, 2\\)"):
        ops.lowbit_linear(x, qw)
    qw.scale, qw.zero = w8.scale, w8.zero.half()
    with pytest.raises(TypeError, match="zero must have the dtype of scale"):
        ops.lowbit_linear(x, qw)


@pytest.mark.parametrize("change", ["set_", "resize_", "data", "swap"])
def test_layout_changed_in_place_is_seen(change):
    qw, x = _weight(), _x(2, 64)
    ops.lowbit_linear(x, qw)
    bad = torch.zeros(24, 5, dtype=torch.int32)  # 5 words per row, 8 needed
    if change == "set_":
        qw.qweight.set_(bad)
    elif change == "resize_":
        qw.qweight.resize_(24, 5)
    elif change == "data":
        qw.qweight.data = bad  # no version bump: the storage address changes
    else:
        torch.utils.swap_tensors(qw.qweight, bad)
    with pytest.raises(ValueError, match="qweight must have 8 words per row"):
        ops.lowbit_linear(x, qw)


def test_inference_tensors_have_no_version_counter_and_still_work():
    with torch.inference_mode():
        qw, x = _weight(), _x(2, 64)
        out = ops.lowbit_linear(x, qw)
        assert _close(out, _want(x, qw))
        qw.scale.resize_(24, 1)  # an inference tensor's in-place change bumps no version
        with pytest.raises(ValueError, match="scale must have shape"):
            ops.lowbit_linear(x, qw)


def test_forced_and_newly_declared_backends_are_honoured(monkeypatch):
    qw, x = _weight(), _x(2, 64)
    ops.lowbit_linear(x, qw)  # the default backend's prepared kernel is now cached
    with splitkernels.use_backend("reference"):
        assert torch.equal(ops.lowbit_linear(x, qw), _want(x, qw))
    calls = []

    def spy(*args):
        calls.append(1)
        return ref.lowbit_linear(*args)

    registry.backends()
    saved = dict(registry._registry)
    try:
        registry.declare_backend("spy").kernel("lowbit_linear", {"cpu": 1000})(spy)
        assert torch.equal(ops.lowbit_linear(x, qw), _want(x, qw)) and calls == [1]
    finally:
        registry._registry.clear()
        registry._registry.update(saved)
        registry._changed()
    ops.lowbit_linear(x, qw)
    assert calls == [1]  # the spy is gone with its backend


@cpp_only
def test_isa_and_thread_count_are_read_on_every_call():
    from splitkernels._backends import cpp

    qw, x = _weight(n=70, k=128, bits=4, group=64, dtype=torch.bfloat16), _x(1, 128, torch.bfloat16)
    isa, threads = cpp._C.lowbit_isa(), cpp._C.num_threads()
    try:
        planned = ops.lowbit_linear(x, qw)
        for name in cpp._C.lowbit_isas():
            cpp._C.set_lowbit_isa(name)
            unplanned = cpp.lowbit_linear(x, qw.qweight, qw.scale, qw.zero, 4, 64, None)
            assert torch.equal(ops.lowbit_linear(x, qw), unplanned), name
        cpp._C.set_lowbit_isa(isa)
        for t in (1, 3):
            cpp._C.set_num_threads(t)
            assert torch.equal(ops.lowbit_linear(x, qw), planned), t
        # BLAS path (M >= BLAS_MIN_ROWS): taken or not per call, by the instruction set in use.
        xb = _x(cpp.BLAS_MIN_ROWS, 128, torch.bfloat16)
        for name in ("generic", isa):
            cpp._C.set_lowbit_isa(name)
            want = cpp.lowbit_linear(xb, qw.qweight, qw.scale, qw.zero, 4, 64, None)
            assert torch.equal(ops.lowbit_linear(xb, qw), want), name
    finally:
        cpp._C.set_lowbit_isa(isa)
        cpp._C.set_num_threads(threads)


def test_every_argument_error_still_fires_with_a_cached_plan(backend):
    qw, x = _weight(), _x(2, 64)
    ops.lowbit_linear(x, qw)
    cases = [
        ((x.to(torch.int64), qw), TypeError, "x must have dtype in \\(float32, float16, bfloat16\\), got int64"),
        ((torch.tensor(1.0), qw), ValueError, "x must have at least 1 dimension"),
        (([1.0] * 64, qw), TypeError, "x must be a torch.Tensor, got list"),
        ((_x(2, 63), qw), ValueError, "x has 63 features, qweight expects in_features = 64"),
        ((x, qw.dequantize()), TypeError, "qweight must be a QuantizedWeight, got Tensor"),
        ((x, qw, torch.randn(23)), ValueError, "bias must have 24 entries, got 23"),
        ((x, qw, torch.randn(24, 1)), ValueError, "bias must be 1-D"),
        ((x, qw, torch.ones(24, dtype=torch.int32)), TypeError, "bias must have dtype"),
        ((x.to("meta"), qw), ValueError, "all tensors must be on one device: x on meta, qweight on cpu"),
        ((x, qw, torch.randn(24, device="meta")), ValueError, "bias on meta"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            ops.lowbit_linear(*args)
    mixed = QuantizedWeight(qw.qweight, qw.scale.to("meta"), qw.zero.to("meta"), 4, 32, 64)
    for _ in range(2):  # the plan of a weight on two devices is cached too; the error must stay
        with pytest.raises(ValueError, match="qweight on cpu, scale on meta"):
            ops.lowbit_linear(x, mixed)


def test_autograd_meta_and_fake_tensors_go_through_the_op(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls = []
    op = ops._lowbit_linear
    monkeypatch.setattr(ops, "_lowbit_linear", lambda *a: calls.append(1) or op(*a))
    qw, x = _weight(), _x(3, 64)
    eager = ops.lowbit_linear(x, qw)
    assert calls == []
    assert ops.lowbit_linear(x.clone().requires_grad_(), qw).requires_grad and calls == [1]
    scale = qw.scale.clone().requires_grad_()
    graded = QuantizedWeight(qw.qweight, scale, qw.zero, 4, 32, 64)
    assert torch.equal(ops.lowbit_linear(x, graded).detach(), eager) and calls == [1, 1]
    with torch.no_grad():
        ops.lowbit_linear(x.clone().requires_grad_(), graded)
    assert calls == [1, 1]
    meta = qw.to("meta")
    assert ops.lowbit_linear(x.to("meta"), meta).shape == (3, 24) and calls == [1, 1, 1]
    with FakeTensorMode() as mode:
        fake_qw = QuantizedWeight(*(mode.from_tensor(t) for t in (qw.qweight, qw.scale, qw.zero)), 4, 32, 64)
        assert ops.lowbit_linear(mode.from_tensor(x), fake_qw).shape == (3, 24)
    assert calls == [1, 1, 1, 1]


def test_scales_in_another_dtype_are_read_as_they_are():
    qw, x = _weight(dtype=torch.float32), _x(2, 64, torch.bfloat16)
    out = ops.lowbit_linear(x, qw)
    assert out.dtype == torch.bfloat16 and _close(out, _want(x, qw), 1e-2)


def test_non_contiguous_weights_are_read_afresh():
    qw, x = _weight(), _x(2, 64)
    strided = QuantizedWeight(qw.qweight.t().contiguous().t(), qw.scale.t().contiguous().t(),
                              qw.zero.t().contiguous().t(), 4, 32, 64)
    assert not strided.qweight.is_contiguous()
    assert _close(ops.lowbit_linear(x, strided), _want(x, qw))
    with torch.no_grad():
        strided.scale.mul_(2)
        strided.zero.mul_(2)
    assert _close(ops.lowbit_linear(x, strided), 2 * _want(x, qw))


def test_compiled_call_checks_and_matches_eager():
    qw, x = _weight(), _x(3, 64)
    compiled = torch.compile(lambda t: ops.lowbit_linear(t, qw) * 2, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), ops.lowbit_linear(x, qw) * 2)


def test_plans_go_with_their_weights():
    gc.collect()  # weights that earlier tests left in reference cycles go first, with their plans
    before = len(lp._plans)
    qw = _weight()
    ops.lowbit_linear(_x(1, 64), qw)
    assert len(lp._plans) == before + 1
    del qw
    gc.collect()
    assert len(lp._plans) == before


def test_quantlinear_keeps_one_plan_until_its_buffers_change(counted):
    layer = QuantLinear.from_quantized(_weight(), torch.randn(24))
    x = _x(2, 64)
    first = layer(x)
    layer(x)
    assert counted["check"] == 1
    other = QuantLinear.from_quantized(_weight(seed=7), torch.randn(24))
    layer.load_state_dict(other.state_dict())  # copies into the same buffers
    assert torch.equal(layer(x), other(x)) and not torch.equal(layer(x), first)
    layer.qweight = other.qweight.clone()  # a new buffer object: a new QuantizedWeight and plan
    checks = counted["check"]
    assert torch.equal(layer(x), other(x)) and counted["check"] == checks + 1
    assert torch.equal(layer.to(torch.bfloat16)(x.bfloat16()), other.to(torch.bfloat16)(x.bfloat16()))
