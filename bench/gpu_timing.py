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

    def __init__(self, reps: int, warmup: int, flush: str = "read") -> None:
        if flush not in ("read", "write"):
            raise ValueError(f"flush must be 'read' or 'write', got {flush!r}")
        self.reps, self.warmup, self.flush_kind = reps, warmup, flush
        self.flush = torch.zeros(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
        self.sink = torch.empty((), dtype=torch.uint8, device="cuda")

    def _flush(self) -> None:
        if self.flush_kind == "read":
            torch.amax(self.flush, dim=0, out=self.sink)
        else:
            self.flush.zero_()

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for s, e in zip(starts, ends):
            self._flush()
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


if __name__ == "__main__":
    # The method's own check: one cuBLAS GEMV and a copy after each kind of flush.
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    for kind in ("read", "write"):
        timer = Timer(50, 10, flush=kind)
        gemv = timer(lambda: torch.nn.functional.linear(x, w))
        print(f"{kind} flush: fp16 F.linear 1 x 4096 x 4096 {gemv * 1e6:.1f} us "
              f"({2 * w.numel() / gemv / 1e9:.0f} GB/s of weights), 1 GiB copy {copy_bandwidth(timer) / 1e9:.0f} GB/s")
