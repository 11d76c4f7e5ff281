"""W8A8 ``int8_linear`` on the CPU beside PyTorch's own int8 kernels and dense ``F.linear``.

For each (M, N, K), in the same process and in interleaved rounds: ``ops.int8_linear`` (fp32
activations, per-token int8 quantisation included) under ``--backend``; PyTorch's
``_weight_int8pack_mm`` (int8 weights, bf16 activations: weight-only, what torchao uses on CPU);
``torch._int_mm`` on activations quantised beforehand (the int8 x int8 GEMM alone, a lower bound that
skips our quantise and rescale); and fp32 / bf16 ``F.linear``. "GB/s" counts the int8 weight bytes
read once per call; "of copy" divides it by the bandwidth of a large ``Tensor.copy_`` in the same run.

"ours/int8pack" is our median over PyTorch's ``_weight_int8pack_mm`` median in the same row
(< 1: ours is faster). ``--threads`` runs every row once per thread count (ours and PyTorch set to
the same count); ``--clock thread`` times the CPU time of the calling thread (robust to other
processes on a shared machine, only with ``--threads 1``); ``--busy N`` repeats everything while
N other processes spin, to show whether threads collapse when a core is taken.

Usage: python bench/ops/int8_linear.py --out DIR [--backend cpp] [--m 1,8,32,128,512]
       [--shapes 4096x4096,1536x576] [--threads 1,all] [--clock wall|thread] [--busy 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timing  # noqa: E402  (bench/timing.py)

import splitkernels  # noqa: E402
from splitkernels import ops  # noqa: E402
from splitkernels._backends import cpp  # noqa: E402
from splitkernels.quant import quantize_weight_int8  # noqa: E402

OURS, PEER = "ours", "torch _weight_int8pack_mm (bf16)"


def _candidates(m: int, n: int, k: int, backend: str) -> dict:
    g = torch.Generator().manual_seed(m * n + k)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g)
    w8, s8 = quantize_weight_int8(w)
    xb, wb, sb = x.bfloat16(), w.bfloat16(), s8.bfloat16()
    x8 = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)

    # Every row reads its own copy of the weights: rows that shared one found it in the cache
    # the row before them had filled (at 4096 x 4096 that halved int8pack's time at M = 1).
    w8_kernel, w8_pack, w8_mm = w8.clone(), w8.clone(), w8.clone()
    kernels = {f"{OURS} ({backend})": lambda: ops.int8_linear(x, w8, s8)}
    if backend == "cpp":  # the same kernel without the op layer (checks, torch.library dispatch)
        kernels[f"{OURS} (cpp, kernel call only)"] = lambda: cpp.int8_linear(x, w8_kernel, s8, None)
    return {
        **kernels,
        "torch _weight_int8pack_mm (bf16)": lambda: torch.ops.aten._weight_int8pack_mm(xb, w8_pack, sb),
        "torch _int_mm (GEMM only)": lambda: torch._int_mm(x8, w8_mm.t()),
        "fp32 F.linear": lambda: F.linear(x, w),
        "bf16 F.linear": lambda: F.linear(xb, wb),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for int8_linear.json / .md")
    p.add_argument("--backend", default="cpp")
    p.add_argument("--m", default="1,8,32,128,512")
    p.add_argument("--shapes", default="4096x4096,1536x576", help="NxK list")
    p.add_argument("--threads", default="all", help="comma list of thread counts, 'all' = every CPU")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="thread: CPU time of the calling thread; only with --threads 1")
    p.add_argument("--busy", type=int, default=0, help="also run with this many spinning processes")
    p.add_argument("--budget", type=float, default=0.5, help="seconds per shape and M")
    a = p.parse_args()
    counts = [os.cpu_count() or 1 if t == "all" else int(t) for t in a.threads.split(",")]
    if a.clock == "thread" and counts != [1]:
        p.error("--clock thread needs --threads 1: other threads' CPU time would not be counted")
    clock = time.thread_time if a.clock == "thread" else time.perf_counter
    start = time.perf_counter()
    torch.set_num_threads(counts[0])  # the copy-bandwidth yardstick runs on the first thread count
    result, bw = timing.new_result(a.backend, clock)
    result.update(command="python " + " ".join(sys.argv), clock=a.clock)
    lines = [f"# int8_linear vs PyTorch (CPU, {result['machine']['cpu']}, kernel ISA "
             f"{result['machine'].get('kernel_isa')}, copy {bw / 1e9:.1f} GB/s at {counts[0]} thread(s), "
             f"clock {a.clock})", "",
             f"Command: `{result['command']}`", "",
             "| N x K | M | threads | busy | kernel | median ms | weight GB/s | of copy | ours/int8pack |",
             "|---|---|---|---|---|---|---|---|---|"]
    for busy in [0] + ([a.busy] if a.busy else []):
        with timing.BusyCores(busy):
            for threads in counts:
                torch.set_num_threads(threads)
                cpp._C.set_num_threads(threads)
                for shape in a.shapes.split(","):
                    n, k = (int(v) for v in shape.split("x"))
                    for m in (int(v) for v in a.m.split(",")):
                        timing.progress(f"[{time.perf_counter() - start:5.0f} s] {n}x{k} M={m} threads={threads} busy={busy}")
                        fns = _candidates(m, n, k, a.backend)
                        with splitkernels.use_backend(a.backend):  # the ops.* calls; torch's are unaffected
                            times = timing.compare(fns, budget_s=a.budget, clock=clock)
                        for name, t in times.items():
                            gbps = n * k / t["median"] / 1e9
                            result["rows"].append({"n": n, "k": k, "m": m, "threads": threads, "busy": busy,
                                                   "kernel": name, **t, "weight_gbps": gbps})
                            mark = f"{t['median'] / times[PEER]['median']:.2f}" if name.startswith(OURS) else ""
                            lines.append(f"| {n} x {k} | {m} | {threads} | {busy} | {name} | {t['median'] * 1e3:.3f} | "
                                         f"{gbps:.1f} | {gbps * 1e9 / bw:.0%} | {mark} |")
    result["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - start
    lines += ["", f"Load average at start {result['machine']['loadavg_start'][0]:.1f}, at end "
              f"{result['loadavg_end'][0]:.1f}; run took {result['wall_s']:.0f} s."]
    timing.write(a.out, "int8_linear", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
