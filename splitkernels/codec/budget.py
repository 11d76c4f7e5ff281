"""Mode ``budget``: spend a frame-wide bit budget on the tokens where it cuts the most error."""
from __future__ import annotations

import heapq

import numpy as np
import torch

from ..ops import reference
from .frame import frame_nbytes


def allocate_bits(
    lo16: torch.Tensor,
    hi: torch.Tensor,
    counts: torch.Tensor,
    raw_tokens: torch.Tensor,
    d: int,
    dtype: torch.dtype,
    bit_choices: tuple[int, ...],
    avg_bits: float,
) -> torch.Tensor:
    """Greedy marginal-gain allocation of per-token widths (u8 [T]).

    Every token starts at the smallest width; upgrades are taken in order of estimated
    squared-error reduction per extra frame bit while the whole frame (header, per-token
    fields, outliers, padded streams, CRC) stays within ``avg_bits * T * d`` bits. Tokens that
    must travel raw (``raw_tokens``) are charged at raw size. If even the smallest widths do not
    fit, every token gets the smallest width.
    """
    t = lo16.shape[0]
    raw = reference.raw_width(dtype)
    choices = sorted(bit_choices)
    n_in = (d - counts).to(torch.int64)
    # errors[t, k]: estimated squared error of token t at width choices[k].
    errors = torch.stack(
        [reference.estimated_sq_error(reference.step_for(lo16, hi, b), n_in) for b in choices], -1
    ).cpu().numpy()
    cost = np.array([8 * ((d * b + 7) // 8) for b in choices], dtype=np.int64)
    raw_mask = raw_tokens.cpu().numpy().astype(bool)

    fixed_bits = 8 * frame_nbytes(t, d, dtype, int(counts.sum()), 0) + int(raw_mask.sum()) * d * raw
    remaining = int(avg_bits * t * d) - fixed_bits - int((~raw_mask).sum()) * int(cost[0])
    level = np.zeros(t, dtype=np.int64)
    heap = []

    def push(tok: int) -> None:
        k = level[tok]
        if k + 1 < len(choices):
            gain = (errors[tok, k] - errors[tok, k + 1]) / (cost[k + 1] - cost[k])
            heapq.heappush(heap, (-gain, tok))

    if remaining >= 0:
        for tok in np.flatnonzero(~raw_mask):
            push(int(tok))
    while heap:
        _, tok = heapq.heappop(heap)
        k = level[tok]
        extra = int(cost[k + 1] - cost[k])
        if extra <= remaining:
            remaining -= extra
            level[tok] = k + 1
            push(tok)
    bits = np.array(choices, dtype=np.int64)[level]
    bits = np.where(raw_mask, raw, bits)
    return torch.from_numpy(bits.astype(np.uint8)).to(lo16.device)
