"""Fixtures shared by the op tests: every backend that can run on CPU tensors here."""
import pytest

import splitkernels


def _cpu_backends() -> list[str]:
    info = splitkernels.backends()
    return [n for n, b in info.items() if b["available"] and ("cpu" in b["devices"] or "*" in b["devices"])]


@pytest.fixture(scope="session")
def cpu_backend_names() -> list[str]:
    """Names of the available backends that serve CPU tensors (the Triton one under TRITON_INTERPRET=1)."""
    return _cpu_backends()


@pytest.fixture(params=_cpu_backends())
def backend(request):
    """Runs the test once per CPU-capable backend, with that backend forced."""
    with splitkernels.use_backend(request.param):
        yield request.param
