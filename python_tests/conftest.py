"""Fixtures shared by the op tests: every backend that can run on CPU tensors here.

Without a CUDA device the Triton kernels can only run in Triton's interpreter, which must be
chosen before Triton is first imported: set it here, before anything imports splitkernels, so a
plain ``pytest python_tests`` runs the Triton tests too (``TRITON_INTERPRET=0`` opts out).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import splitkernels  # noqa: E402


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


@pytest.fixture
def poisoned_empty(monkeypatch):
    """``torch.empty`` hands out buffers full of 0xA5 bytes, so a byte a kernel forgets to write
    cannot pass as zero (bool tensors excepted: 0xA5 is not a valid bool)."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.numel() and t.dtype != torch.bool:
            t.view(-1).view(torch.uint8).fill_(0xA5)
        return t

    monkeypatch.setattr(torch, "empty", empty)
