"""The triton backend: the default for CUDA tensors (kernels in :mod:`splitkernels.triton`).

Available when Triton imports and a CUDA device exists, or when ``TRITON_INTERPRET=1`` is
set before Triton is imported: then it also serves CPU tensors through the interpreter, at a
negative priority (only inside ``use_backend("triton")``, for tests; the CPU default stays
``cpp`` then ``reference``). Never raises at import.
"""
from __future__ import annotations

import os

import torch

from ..registry import declare_backend

_HINT = "Install Triton (Linux x86_64) and use a CUDA GPU, or set TRITON_INTERPRET=1 for the CPU interpreter."


def _declare() -> None:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    try:
        from ..triton import (bitpack, codec_decode, codec_encode, codec_v2_dequantise, codec_v2_quantise, int8_gemm,
                              lowbit_gemm)
    except ImportError as exc:
        declare_backend("triton", f"triton does not import ({exc})", _HINT)
        return
    if not interpret and not torch.cuda.is_available():
        declare_backend("triton", "no CUDA device", _HINT)
        return
    priority = {"cuda": 30, "cpu": -1} if interpret else {"cuda": 30}
    declare_backend("triton", install_hint=_HINT).add_kernels(
        {
            "pack_bits": bitpack.pack_bits,
            "unpack_bits": bitpack.unpack_bits,
            "lowbit_linear": lowbit_gemm.lowbit_linear,
            "int8_linear": int8_gemm.int8_linear,
            "ts_tabq_encode": codec_encode.ts_tabq_encode,
            "ts_tabq_decode": codec_decode.ts_tabq_decode,
            "codec_v2_encode": codec_v2_quantise.codec_v2_encode,
            "codec_v2_decode": codec_v2_dequantise.codec_v2_decode,
        },
        priority=priority,
    )


_declare()
