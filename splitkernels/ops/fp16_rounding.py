"""Deprecated: :func:`round_down_fp16` / :func:`round_up_fp16` moved to :mod:`splitkernels.formats`;
this module re-exports them."""
import warnings

from ..formats.activations import round_down_fp16, round_up_fp16

warnings.warn(
    "splitkernels.ops.fp16_rounding is deprecated; use splitkernels.formats", DeprecationWarning, stacklevel=2
)

__all__ = ["round_down_fp16", "round_up_fp16"]
