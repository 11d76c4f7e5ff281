"""W8A8 ``int8_linear`` on the CPU beside PyTorch's own int8 kernels and dense ``F.linear``.

For each (M, N, K), in the same process and in interleaved rounds: ``ops.int8_linear`` (fp32
activations, per-token int8 quantisation included) under ``--backend``; PyTorch's
``_weight_int8pack_mm`` (int8 weights, bf16 activations: weight-only, what torchao uses on CPU);
``torch._int_mm`` on activations quantised beforehand (the int8 x int8 GEMM alone, a lower bound that
skips our quantise and rescale); and fp32 / bf16 ``F.linear``. "GB/s" counts the int8 weight bytes
read once per call; "of copy" divides it by the bandwidth of a large ``Tensor.copy_`` in the same run.

Usage: python bench/ops/int8_linear.py --out DIR [--backend cpp] [--m 1,16,64] [--shapes 4096x4096,1536x576]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timing  # noqa: E402  (bench/timing.py)

import splitkernels  # noqa: E402
from splitkernels import ops  # noqa: E402
from splitkernels.quant import quantize_weight_int8  # noqa: E402


def _candidates(m: int, n: int, k: int, backend: str) -> dict:
    g = torch.Generator().manual_seed(m * n + k)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g)
    w8, s8 = quantize_weight_int8(w)
    xb, wb, sb = x.bfloat16(), w.bfloat16(), s8.bfloat16()
    x8 = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)

    def ours():
        with splitkernels.use_backend(backend):
            return ops.int8_linear(x, w8, s8)

    return {
        f"ours ({backend})": ours,
        "torch _weight_int8pack_mm (bf16)": lambda: torch.ops.aten._weight_int8pack_mm(xb, w8, sb),
        "torch _int_mm (GEMM only)": lambda: torch._int_mm(x8, w8.t()),
        "fp32 F.linear": lambda: F.linear(x, w),
        "bf16 F.linear": lambda: F.linear(xb, wb),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for int8_linear.json / .md")
    p.add_argument("--backend", default="cpp")
    p.add_argument("--m", default="1,16,64")
    p.add_argument("--shapes", default="4096x4096,1536x576", help="NxK list")
    p.add_argument("--budget", type=float, default=0.5, help="seconds per shape and M")
    a = p.parse_args()
    start = time.perf_counter()
    result, bw = timing.new_result(a.backend)
    lines = [f"# int8_linear vs PyTorch (CPU, {result['machine']['cpu']}, threads "
             f"{torch.get_num_threads()}, copy {bw / 1e9:.1f} GB/s)", "",
             "| N x K | M | kernel | median ms | weight GB/s | of copy |", "|---|---|---|---|---|---|"]
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for m in (int(v) for v in a.m.split(",")):
            timing.progress(f"[{time.perf_counter() - start:5.0f} s] {n}x{k} M={m}")
            times = timing.compare(_candidates(m, n, k, a.backend), budget_s=a.budget)
            for name, t in times.items():
                gbps = n * k / t["median"] / 1e9
                result["rows"].append({"n": n, "k": k, "m": m, "kernel": name, **t, "weight_gbps": gbps})
                lines.append(f"| {n} x {k} | {m} | {name} | {t['median'] * 1e3:.3f} | {gbps:.1f} | "
                             f"{gbps * 1e9 / bw:.0%} |")
    timing.write(a.out, "int8_linear", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
