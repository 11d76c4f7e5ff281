"""Group-wise asymmetric weight quantisation into the packed format of docs/FORMATS.md.

:class:`QuantizedWeight` and ``WEIGHT_FORMAT_VERSION`` live in :mod:`splitkernels.formats`; they
are re-exported here for the callers that import them from this module.
"""
from __future__ import annotations

import torch

from .formats import WEIGHT_BITS, WEIGHT_FORMAT_VERSION, QuantizedWeight, pack_weight_codes
from .ops import reference
from .ops.checks import FLOAT_DTYPES, check_choice, check_tensor

# Shrink factors tried by the clipping search (1.0 = plain min/max).
_CLIP_GRID = tuple(1.0 - 0.02 * i for i in range(16))
# Factors tried, independently, on each end of a group's range by the weighted range search.
RANGE_GRID = tuple(1.0 - 0.05 * i for i in range(8))


def _check_weight_args(w: torch.Tensor, bits: int, group_size: int) -> None:
    check_tensor("w", w, FLOAT_DTYPES, ndim=2)
    check_choice("bits", bits, WEIGHT_BITS)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if w.shape[1] % group_size:
        raise ValueError(f"group_size must divide K = {w.shape[1]}, got {group_size}")
    if not torch.isfinite(w).all():
        raise ValueError("w must be finite (found NaN or Inf)")


def _fit_groups(wg: torch.Tensor, bits: int, shrink: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scale and zero for groups ``wg [N, G, g]`` (fp32) with the range shrunk by ``shrink``."""
    qmax = 2**bits - 1
    lo = wg.amin(-1) * shrink
    hi = wg.amax(-1) * shrink
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round((wg - lo.unsqueeze(-1)) / scale.unsqueeze(-1)), 0, qmax)
    return q, scale, lo


def quantize_weight(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    clip_search: bool = False,
    dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """Quantise ``w [N, K]`` (out, in) group-wise and asymmetrically to ``bits`` in {2, 3, 4, 8}.

    ``group_size`` must divide K. ``clip_search`` tries shrinking each group's range and keeps
    the factor with the least squared reconstruction error (helps at 2-3 bits). ``dtype`` is
    the dtype of scale and zero (default: w's dtype).
    """
    _check_weight_args(w, bits, group_size)
    n, k = w.shape
    dtype = dtype or w.dtype
    wg = w.float().reshape(n, k // group_size, group_size)
    grid = _CLIP_GRID if clip_search else (1.0,)
    best = None
    for shrink in grid:
        q, scale, zero = _fit_groups(wg, bits, shrink)
        # Error of what will actually be stored: scale and zero rounded to the compute dtype.
        s, z = scale.to(dtype).float(), zero.to(dtype).float()
        err = ((q * s.unsqueeze(-1) + z.unsqueeze(-1) - wg) ** 2).sum(-1)
        if best is None:
            best = (err, q, s, z)
            continue
        better = err < best[0]
        best = (
            torch.where(better, err, best[0]),
            torch.where(better.unsqueeze(-1), q, best[1]),
            torch.where(better, s, best[2]),
            torch.where(better, z, best[3]),
        )
    _, q, scale, zero = best
    codes = q.reshape(n, k).to(torch.uint8)
    qweight = pack_weight_codes(codes, bits)
    return QuantizedWeight(qweight, scale.to(dtype), zero.to(dtype), bits, group_size, k)


def search_group_ranges(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    importance: torch.Tensor | None = None,
    grid: tuple[float, ...] = RANGE_GRID,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero ``[N, K / group_size]`` for each group of ``w [N, K]``, each end of the range
    (``min * a``, ``max * b``, ``a`` and ``b`` from ``grid``) chosen to minimise the rounding error
    ``sum_k importance[k] * (w[:, k] - dequant)^2`` over the group (importance ``[K] >= 0``, e.g. the
    Hessian's diagonal: the energy of each input; default all ones).

    The error is that of the stored (``dtype``-rounded) scale and zero; ties keep the earlier grid
    point, so with ``1.0`` first a group that min/max already represents exactly keeps min/max.
    """
    _check_weight_args(w, bits, group_size)
    n, k = w.shape
    dtype = dtype or w.dtype
    if importance is None:
        importance = torch.ones(k, device=w.device)
    check_tensor("importance", importance, FLOAT_DTYPES + (torch.float64,), ndim=1)
    if importance.shape[0] != k or not bool((importance >= 0).all()):
        raise ValueError(f"importance must be [K] = [{k}] non-negative values, got shape {tuple(importance.shape)}")
    if not grid or any(not 0.0 < f <= 1.0 for f in grid):
        raise ValueError(f"grid must be non-empty factors in (0, 1], got {grid!r}")
    qmax = 2**bits - 1
    wg = w.float().reshape(n, k // group_size, group_size)
    weight = importance.to(device=w.device, dtype=torch.float32).reshape(1, k // group_size, group_size)
    lo0, hi0 = wg.amin(-1), wg.amax(-1)
    best = None
    for a in grid:
        for b in grid:
            lo, hi = lo0 * a, hi0 * b
            scale = (hi - lo) / qmax
            scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(dtype).float()
            scale = scale.clamp_min(torch.finfo(dtype).tiny)  # a range below the dtype's resolution
            lo = lo.to(dtype).float()
            q = torch.clamp(torch.round((wg - lo.unsqueeze(-1)) / scale.unsqueeze(-1)), 0, qmax)
            err = ((q * scale.unsqueeze(-1) + lo.unsqueeze(-1) - wg) ** 2 * weight).sum(-1)
            if best is None:
                best = (err, scale, lo)
                continue
            better = err < best[0]
            best = (torch.where(better, err, best[0]), torch.where(better, scale, best[1]),
                    torch.where(better, lo, best[2]))
    return best[1].to(dtype), best[2].to(dtype)


def quantize_weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 weights for :func:`splitkernels.ops.int8_linear`: (w_int8, scale fp32)."""
    check_tensor("w", w, FLOAT_DTYPES, ndim=2)
    return reference.quantize_rows_int8(w)


__all__ = ["QuantizedWeight", "WEIGHT_FORMAT_VERSION", "quantize_weight", "quantize_weight_int8", "search_group_ranges",
           "RANGE_GRID"]
