"""The triton backend: the default for CUDA tensors (kernels in :mod:`splitkernels.triton`).

Available when Triton imports and a CUDA device exists, or when ``TRITON_INTERPRET=1`` is
set before Triton is imported: then it also serves CPU tensors through the interpreter (for
tests; the CPU default stays ``cpp`` then ``reference``). Never raises at import.
"""
from __future__ import annotations

import os

import torch

from .._backend import Backend, register_backend

_HINT = "Install Triton (pip install triton; Linux x86_64) and use a CUDA GPU, or set TRITON_INTERPRET=1 for the CPU interpreter."


def _make() -> Backend:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    try:
        from ..triton import bitpack, codec, int8_gemm, lowbit_gemm
    except ImportError as exc:
        return Backend("triton", devices=(), unavailable_reason=f"triton does not import ({exc})", install_hint=_HINT)
    if not interpret and not torch.cuda.is_available():
        return Backend("triton", devices=(), unavailable_reason="no CUDA device", install_hint=_HINT)
    devices = ("cuda", "cpu") if interpret else ("cuda",)
    return Backend(
        "triton",
        devices=devices,
        kernels={
            "pack_bits": bitpack.pack_bits,
            "unpack_bits": bitpack.unpack_bits,
            "lowbit_linear": lowbit_gemm.lowbit_linear,
            "int8_linear": int8_gemm.int8_linear,
            "ts_tabq_encode": codec.ts_tabq_encode,
            "ts_tabq_decode": codec.ts_tabq_decode,
        },
        install_hint=_HINT,
    )


register_backend(_make())
