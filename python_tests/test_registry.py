"""The kernel registry: discovery of backend modules, priorities per device, forcing a backend."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import splitkernels
from splitkernels import ops, registry
from splitkernels.ops import reference as ref


@pytest.fixture
def scratch():
    """Declare throw-away backends; they vanish from the registry after the test (a change
    of the kernel table like any other, so kernels prepared meanwhile are not reused)."""
    registry.backends()  # discover the real ones first
    saved = dict(registry._registry)
    yield registry.declare_backend
    registry._registry.clear()
    registry._registry.update(saved)
    registry._changed()


def test_highest_available_priority_wins_and_negative_means_forced_only(scratch):
    calls = []

    def spy(name):
        def kernel(codes, bits):
            calls.append(name)
            return ref.pack_bits(codes, bits)
        return kernel

    scratch("fast").kernel("pack_bits", {"cpu": 1000})(spy("fast"))
    scratch("hidden").kernel("pack_bits", {"cpu": -1})(spy("hidden"))
    scratch("broken", unavailable_reason="no device").kernel("pack_bits", {"cpu": 2000})(spy("broken"))
    codes = torch.randint(0, 8, (3, 11), dtype=torch.uint8)
    assert torch.equal(ops.pack_bits(codes, 3), ref.pack_bits(codes, 3)) and calls == ["fast"]
    with splitkernels.use_backend("hidden"):
        ops.pack_bits(codes, 3)
    assert calls == ["fast", "hidden"]
    with pytest.raises(RuntimeError, match="backend 'broken' is not available: no device"):
        with splitkernels.use_backend("broken"):
            pass
    info = splitkernels.backends()
    assert info["fast"] == {"available": True, "devices": ["cpu"], "ops": ["pack_bits"], "reason": None}
    assert info["broken"]["devices"] == [] and info["broken"]["ops"] == []


def test_forced_backend_never_falls_back(scratch):
    scratch("gpu_only").kernel("pack_bits", {"cuda": 5})(ref.pack_bits)
    codes = torch.zeros(2, 4, dtype=torch.uint8)
    with splitkernels.use_backend("gpu_only"):
        with pytest.raises(RuntimeError, match="does not serve cpu tensors"):
            ops.pack_bits(codes, 2)
        with pytest.raises(RuntimeError, match="has no kernel for op 'unpack_bits'"):
            ops.unpack_bits(codes, 2, 4)


def test_declaration_errors(scratch):
    backend = scratch("twice")
    with pytest.raises(ValueError, match="declared twice"):
        scratch("twice")
    backend.kernel("pack_bits", {"cpu": 1})(ref.pack_bits)
    with pytest.raises(ValueError, match="already has a kernel for op 'pack_bits'"):
        backend.kernel("pack_bits", {"cpu": 2})
    with pytest.raises(TypeError, match="priority must map device types"):
        backend.kernel("unpack_bits", 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        splitkernels.use_backend("nope").__enter__()


def test_adding_a_backend_is_one_new_module(tmp_path):
    """A module dropped into the backends folder is found and used, with no other edit."""
    (tmp_path / "toy.py").write_text(textwrap.dedent(
        """
        from splitkernels.ops import reference
        from splitkernels.registry import declare_backend

        CALLS = []
        backend = declare_backend("toy", install_hint="none needed")

        @backend.kernel("unpack_bits", {"cpu": 99})
        def unpack_bits(packed, bits, n):
            CALLS.append(n)
            return reference.unpack_bits(packed, bits, n)
        """
    ))
    script = textwrap.dedent(
        f"""
        import sys, torch
        import splitkernels._backends
        splitkernels._backends.__path__.append({str(tmp_path)!r})
        import splitkernels
        from splitkernels import ops
        info = splitkernels.backends()["toy"]
        assert info["available"] and info["ops"] == ["unpack_bits"], info
        packed = ops.pack_bits(torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.uint8), 3)
        assert ops.unpack_bits(packed, 3, 5).tolist() == [[1, 2, 3, 4, 5]]
        toy = sys.modules["splitkernels._backends.toy"]
        assert toy.CALLS == [5], toy.CALLS
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_old_registry_module_still_works():
    with pytest.warns(DeprecationWarning, match="splitkernels.registry"):
        sys.modules.pop("splitkernels._backend", None)
        from splitkernels import _backend
    assert _backend.resolve is registry.resolve and _backend.use_backend is registry.use_backend
