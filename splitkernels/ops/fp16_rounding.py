"""Re-export of :func:`splitkernels.formats.round_down_fp16` / ``round_up_fp16`` (their old home).

Deprecated: import them from :mod:`splitkernels.formats`.
"""
from ..formats.activations import round_down_fp16, round_up_fp16

__all__ = ["round_down_fp16", "round_up_fp16"]
