"""Launches the cuda backend's decode GEMV a few times per case, for a profiler to read.

    ncu --kernel-name regex:gemv --launch-skip 2 --launch-count 1 --section SpeedOfLight ... \\
        python bench/gpu_profile_gemv.py [--cases 1x4096x4096,16x4096x4096] [--calls 3]

Each case ``MxNxK`` builds a W4 g128 weight (fp16 scales and zeros) and fp16 activations, then calls
``ops.lowbit_linear`` on the cuda backend ``--calls`` times in a row, so the profiler's launch
filters pick the same kernel once it is warm. It times nothing itself: the first GPU run (H200,
bench/results/gpu-20261130) measured the M = 1 GEMV at 15-27% of HBM bandwidth without the
device time to say why; ``bench/gpu_check.sh`` runs this under Nsight Compute where it is installed.
"""
from __future__ import annotations

import argparse

import torch

import splitkernels
from splitkernels import ops
from splitkernels.quant import quantize_weight


def parse_cases(text: str) -> list[tuple[int, int, int]]:
    cases = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--cases: each case is MxNxK with positive integers, got {item!r}")
        cases.append(tuple(int(p) for p in parts))
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="1x4096x4096,16x4096x4096", help="comma-separated MxNxK")
    ap.add_argument("--calls", type=int, default=3, help="calls per case (>= 1)")
    args = ap.parse_args()
    if args.calls < 1:
        raise SystemExit("--calls must be at least 1")
    cases = parse_cases(args.cases)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script launches GPU kernels for a profiler")
    gen = torch.Generator(device="cuda").manual_seed(1)
    for m, n, k in cases:
        qw = quantize_weight(torch.randn(n, k, device="cuda", generator=gen), 4, 128, dtype=torch.float16)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
        with splitkernels.use_backend("cuda"):
            for _ in range(args.calls):
                ops.lowbit_linear(x, qw)
        torch.cuda.synchronize()
        print(f"M={m} N={n} K={k} W4 g128: {args.calls} calls", flush=True)


if __name__ == "__main__":
    main()
