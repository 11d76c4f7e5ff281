"""Timing shared by the CPU op benchmarks in bench/ops/: interleaved medians, the machine, the
copy bandwidth that results are compared against, and result files.

Every benchmark times its candidate and PyTorch's own kernels in the same process, alternating
calls in a random order per round (so background load on a shared machine, and the cold caches
a slow call leaves, hit them alike), after a warm-up, and reports medians. Results go to
``--out DIR`` as ``<name>.json`` and ``<name>.md``; nothing is written over the committed results
in bench/results unless that folder is named.
"""
from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import splitkernels


def compare(fns: dict[str, Callable[[], object]], budget_s: float = 1.0, min_reps: int = 5, max_reps: int = 40,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, dict[str, float]]:
    """Median (and min / max) seconds per call of each fn, measured in interleaved rounds.

    Each fn runs twice as warm-up (page faults, thread pools, oneDNN primitive caches); the
    number of rounds is sized so that all fns together take about ``budget_s``. Every round
    after the first visits the fns in a fresh (seeded) random order: a slow call leaves the
    caches cold for the call after it, and in a fixed order that was always the same method
    (one 6 ms int4pack call with fp32 activations made the next call, W2 at 576 x 1536, M = 4,
    take 0.24 ms instead of 0.15).
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
        fn()
    round_s = 0.0
    for name, fn in fns.items():
        start = clock()
        fn()
        times[name].append(clock() - start)
        round_s += times[name][-1]
    reps = max(min_reps, min(max_reps, int(budget_s / max(round_s, 1e-6))))
    order = list(fns.items())
    shuffle = random.Random(len(order)).shuffle
    for _ in range(reps - 1):
        shuffle(order)
        for name, fn in order:
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "reps": len(v)} for k, v in times.items()}


def copy_bandwidth(clock: Callable[[], float] = time.perf_counter) -> float:
    """Bytes read + written per second by a 256 MiB fp32 ``Tensor.copy_`` (median), torch's threads."""
    src = torch.randn(64 << 20)
    dst = torch.empty_like(src)
    t = compare({"copy": lambda: dst.copy_(src)}, budget_s=1.0, min_reps=5, max_reps=9, clock=clock)["copy"]["median"]
    return 2 * src.numel() * 4 / t


def new_result(backend: str, clock: Callable[[], float] = time.perf_counter) -> tuple[dict, float]:
    """The start of a result file (machine, backend, copy bandwidth, empty rows) and that bandwidth."""
    bw = copy_bandwidth(clock)
    return {"machine": machine(), "backend": backend, "copy_bandwidth_gbps": bw / 1e9, "rows": []}, bw


def machine() -> dict:
    """CPU model, flags that matter to the kernels, versions and load: named in every result."""
    model, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
                flags = [f for f in line.split(":", 1)[1].split() if f in wanted]
    except OSError:
        pass
    info = {
        "cpu": model, "cpu_flags": flags, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
        "python": sys.version.split()[0], "splitkernels": splitkernels.__version__,
        "loadavg_start": os.getloadavg(), "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        # How idle OpenMP workers (torch's, and ours on its team) wait: spinning or asleep.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }
    try:
        from splitkernels._backends import cpp

        info["kernel_isa"] = cpp._C.lowbit_isa()
        info["kernel_threads"] = cpp._C.num_threads()
    except (ImportError, AttributeError):
        pass
    return info


class BusyCores:
    """Context manager that keeps ``n`` other processes spinning (a shared, busy machine)."""

    def __init__(self, n: int) -> None:
        self.n, self.procs = n, []

    def __enter__(self) -> "BusyCores":
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        time.sleep(0.2)
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def write(out: Path, name: str, result: dict, table: str) -> None:
    """Writes ``name``.json and ``name``.md under ``out`` and prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(table)
    print(table)
    print(f"wrote {out / (name + '.json')} and {out / (name + '.md')}")


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
