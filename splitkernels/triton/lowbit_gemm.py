"""Low-bit weight x fp activation matmul (docs/FORMATS.md section 2): the entry point choosing
one of three paths by M (the crossover table is :mod:`.dispatch`; each path's kernel is its own
file): ``gemv`` (:mod:`.lowbit_gemv`), ``tiled`` (:mod:`.lowbit_tiled`), ``dequant``
(:mod:`.lowbit_dequant`). Launch configs are tuned once per GPU and shape key (:mod:`.autotune_cache`).
"""
from __future__ import annotations

import torch
import triton

from ..ops import reference as ref
from . import autotune_cache
from .dispatch import choose_path
from .lowbit_dequant import DequantCache, dequant_cache, dequantize
from .lowbit_gemv import GEMV_CONFIGS, gemv
from .lowbit_tiled import TILED_CONFIGS, tiled

__all__ = ["lowbit_linear", "tuned_config", "gemv", "tiled", "dequantize", "DequantCache", "dequant_cache",
           "GEMV_CONFIGS", "TILED_CONFIGS"]


def tuned_config(kernel: str, fn, candidates, x2, qweight, scale, zero, bits, group_size, bias) -> dict:
    """The launch config of ``fn`` (:func:`gemv` or :func:`tiled`) for this problem, tuned once per key."""
    m, k = x2.shape
    bucket = min(triton.next_power_of_2(m), 256)
    key = f"M{bucket}/N{qweight.shape[0]}/K{k}/b{bits}/g{group_size}/{str(x2.dtype).replace('torch.', '')}"
    return autotune_cache.pick(
        kernel, key, candidates, lambda cfg: fn(x2, qweight, scale, zero, bits, group_size, bias, cfg), x2.device
    )


def lowbit_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Triton kernel of :func:`splitkernels.ops.reference.lowbit_linear` (x contiguous; the kernels
    read scale and zero in x's dtype, converted here where they differ)."""
    k = x.shape[-1]
    n = qweight.shape[0]
    if scale.dtype != x.dtype:
        scale, zero = scale.to(x.dtype), zero.to(x.dtype)
    # No-ops for the usual contiguous tensors (so the dequant cache still sees the same objects).
    qweight, scale, zero = qweight.contiguous(), scale.contiguous(), zero.contiguous()
    bias = bias.contiguous() if bias is not None else None
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if m == 0 or n == 0 or k == 0:
        return ref.lowbit_linear(x, qweight, scale, zero, bits, group_size, bias)
    path = choose_path(m, bits, x.dtype, x.device)
    if path == "gemv":
        cfg = tuned_config("gemv", gemv, GEMV_CONFIGS, x2, qweight, scale, zero, bits, group_size, bias)
        y = gemv(x2, qweight, scale, zero, bits, group_size, bias, cfg)
    elif path == "tiled":
        cfg = tuned_config("tiled", tiled, TILED_CONFIGS, x2, qweight, scale, zero, bits, group_size, bias)
        y = tiled(x2, qweight, scale, zero, bits, group_size, bias, cfg)
    else:
        w = dequant_cache.get(qweight, scale, zero, bits, group_size, k, x.dtype)
        y = torch.nn.functional.linear(x2, w, bias)
    return y.reshape(*x.shape[:-1], n)
