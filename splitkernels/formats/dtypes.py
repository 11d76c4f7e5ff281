"""Element types of the formats (docs/FORMATS.md): which float dtypes travel, and their codes.

One table serves the native kernels (a dtype argument is an int) and the wire frame (its
``dtype`` byte): 0 fp32, 1 fp16, 2 bf16.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CODE_DTYPE = {code: dtype for dtype, code in DTYPE_CODE.items()}


def dtype_code(name: str, t: torch.Tensor) -> int:
    """The code of ``t``'s dtype; TypeError naming ``name`` when it is not fp32, fp16 or bf16."""
    if t.dtype not in DTYPE_CODE:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    return DTYPE_CODE[t.dtype]


def raw_width(dtype: torch.dtype) -> int:
    """Width code of a token whose inliers travel raw in the input dtype (16 or 32)."""
    return torch.empty((), dtype=dtype).element_size() * 8


def exact_div(a: torch.Tensor, divisor: float) -> torch.Tensor:
    """IEEE division by a constant. On CUDA, ``tensor / python_number`` multiplies by the
    reciprocal, which rounds differently; dividing by a tensor keeps every device exact."""
    return a / torch.full_like(a, divisor)
