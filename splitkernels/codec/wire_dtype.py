"""The wire dtype: the dtype a session's frames carry the split layer's hidden state in (its escapes
and raw tokens exact in it, its codes quantised from it), whatever dtype the edge computes in."""
from __future__ import annotations

import torch

WIRE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def to_wire(hidden: torch.Tensor, wire_dtype: torch.dtype | None) -> torch.Tensor:
    """``hidden`` cast to the wire dtype; a value the cast cannot hold (beyond fp16's range) is an
    error, not a silent infinity on the server."""
    if wire_dtype is None or hidden.dtype == wire_dtype:
        return hidden
    out = hidden.to(wire_dtype)
    if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(hidden).all()):
        peak = float(hidden.abs().max())
        raise ValueError(f"wire_dtype {str(wire_dtype).replace('torch.', '')} cannot hold the split-layer hidden "
                         f"state (|x| up to {peak:.4g}); send bfloat16 or float32")
    return out
