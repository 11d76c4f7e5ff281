"""GPU timing shared by the GPU microbenchmarks: CUDA-event medians after an L2 flush, and the
device-to-device copy bandwidth that results are compared against."""
from __future__ import annotations

import statistics
from typing import Callable

import torch

FLUSH_BYTES = 512 << 20


class Timer:
    """Median GPU seconds of a call, each run after an L2 flush, measured with CUDA events.

    The flush *reads* a buffer several times the L2 size, so L2 is left holding clean lines. A
    flush that writes (``zero_()``) leaves L2 full of dirty lines, whose write-back to HBM then
    lands inside the timed call and adds a floor of several microseconds to every small kernel.
    """

    def __init__(self, reps: int, warmup: int) -> None:
        self.reps, self.warmup = reps, warmup
        self.flush = torch.zeros(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
        self.sink = torch.empty((), dtype=torch.uint8, device="cuda")

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for s, e in zip(starts, ends):
            torch.amax(self.flush, dim=0, out=self.sink)
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e-3


def copy_bandwidth(timer: Timer) -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    return 2 * src.numel() / t
