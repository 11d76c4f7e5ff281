"""Two builds of the extension timed against each other, in alternating processes.

Loading both builds into one process would bind the second copy's calls to the first's kernels,
so each round runs one process per build, taking turns (and swapping which goes first every
round). A case is ``NxKxMxBITSxGROUP``: one ``lowbit_linear`` call with M activation rows of
``--dtype`` (float32-medium: fp32 rows and scales, the rows rounded to bf16 for the bf16 kernels)
against an N x K weight, one thread, timed by the CPU time of the calling thread over about
``--seconds`` of calls (with ``--threads N`` above 1: N threads, by the wall clock). Prints the
minimum (the steadier figure on a shared machine) and the median per build and round, in ms.
With ``--cold`` a buffer of ``--evict-mb`` MiB (64; more than the last-level cache where that is
larger, e.g. 512 with 300 MiB of L3) is written before each timed call (not timed), so the
weights come from memory, as in the interleaved rounds of ``bench/ops/lowbit_linear.py``, where
other methods' weights pass through the caches in between. ``--isa NAME`` runs both builds on that
instruction set (``_C.set_lowbit_isa``; one of ``_C.lowbit_isas()``), e.g. the fused FMA kernels
(``avx512``) on a CPU whose default takes the VNNI path or the AMX tiles. ``--outliers`` sets
the first activation of every group to 200, far beyond 32 times the group's mean |x|: the VNNI and
AMX digit paths decline such rows (as they do real models' outlier channels), and fp32 rows then
meet the fused FMA kernels.

Usage: python bench/ops/ab_builds.py --a OLD/_C.so --b NEW/_C.so [--rounds 2] [--dtype float32]
       [--cold [--evict-mb 512]] [--threads 2] [--isa avx512] [--outliers] 4096x4096x16x4x128 1536x576x4x3x64 ...
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

DTYPES = ("float32", "float32-medium", "bfloat16")


def run_cases(so: str, dtype_name: str, seconds: float, cases: list[str], evict_mb: int, threads: int,
              isa: str | None, outliers: bool) -> list[str]:
    """This process's half of a round: each case's minimum and median ms on the build at `so`."""
    import torch

    from splitkernels.formats import DTYPE_CODE
    from splitkernels.quant import quantize_weight

    sys.setdlopenflags(os.RTLD_NOW | os.RTLD_LOCAL | os.RTLD_DEEPBIND)
    target = os.path.join(tempfile.mkdtemp(), os.path.basename(so))
    shutil.copy(so, target)
    spec = importlib.util.spec_from_file_location("_C", target)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    if isa:
        ext.set_lowbit_isa(isa)  # ValueError naming the choices where this CPU or build lacks it
    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name.split("-")[0])
    code = DTYPE_CODE[dtype]
    evict = torch.zeros(evict_mb << 20, dtype=torch.uint8) if evict_mb else None
    out = []
    for case in cases:
        n, k, m, bits, group = map(int, case.split("x"))
        q = quantize_weight(torch.randn(n, k), bits, group, dtype=dtype)
        x, y = torch.randn(m, k).to(dtype), torch.empty(m, n, dtype=dtype)
        if outliers:
            x[:, ::group] = 200.0
        args = (x.data_ptr(), code, m, k, q.qweight.data_ptr(), n, q.qweight.shape[1], q.scale.data_ptr(),
                q.zero.data_ptr(), code, bits, group, 0, y.data_ptr(), dtype_name == "float32-medium")
        for _ in range(3):
            ext.lowbit_linear(*args)
        times = []
        deadline = clock() + seconds
        while clock() < deadline:
            if evict is not None:
                evict.add_(1)
            start = clock()
            ext.lowbit_linear(*args)
            times.append(clock() - start)
        out.append(f"{min(times) * 1e3:.3f}/{statistics.median(times) * 1e3:.3f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True, help="the first build's _C shared object")
    p.add_argument("--b", required=True, help="the second build's _C shared object")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--seconds", type=float, default=1.0, help="timed calls per case and process")
    p.add_argument("--cold", action="store_true", help="evict the caches before each timed call")
    p.add_argument("--evict-mb", type=int, default=64, help="MiB written to evict the caches (--cold)")
    p.add_argument("--threads", type=int, default=1, help="threads (above 1: timed by the wall clock)")
    p.add_argument("--isa", help="the instruction set both builds run (default: the CPU's best)")
    p.add_argument("--outliers", action="store_true", help="one activation a group at 200 (digit paths decline)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("cases", nargs="+", help="NxKxMxBITSxGROUP")
    a = p.parse_args()
    for case in a.cases:
        parts = case.split("x")
        if len(parts) != 5 or not all(v.isdigit() and int(v) > 0 for v in parts):
            p.error(f"a case is NxKxMxBITSxGROUP of positive integers, got {case!r}")
    if a.worker:
        print("\n".join(run_cases(a.worker, a.dtype, a.seconds, a.cases, a.evict_mb if a.cold else 0, a.threads,
                                   a.isa, a.outliers)))
        return
    for so in (a.a, a.b):
        if not os.path.isfile(so):
            p.error(f"no such build: {so}")
    if a.threads < 1:
        p.error("--threads must be at least 1")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "SPLITKERNELS_NUM_THREADS": str(a.threads)}
    results: dict[str, list[list[str]]] = {"a": [], "b": []}
    for r in range(a.rounds):
        order = ("a", "b") if r % 2 == 0 else ("b", "a")
        for name in order:
            cold = ["--cold", "--evict-mb", str(a.evict_mb)] if a.cold else []
            isa = ["--isa", a.isa] if a.isa else []
            outliers = ["--outliers"] if a.outliers else []
            argv = [sys.executable, __file__, "--a", a.a, "--b", a.b, "--dtype", a.dtype, "--seconds",
                    str(a.seconds), "--threads", str(a.threads), *cold, *isa, *outliers, "--worker", getattr(a, name),
                    *a.cases]
            run = subprocess.run(argv, env=env, capture_output=True, text=True)
            if run.returncode:
                last = run.stderr.strip().splitlines()[-1:] or [f"exit status {run.returncode}"]
                raise SystemExit(f"ab_builds.py: build {name} ({getattr(a, name)}): {last[0]}")
            lines = run.stdout.split()
            results[name].append(lines)
            print(f"round {r + 1}: {name} done", file=sys.stderr)
    caches = f"caches evicted before each call ({a.evict_mb} MiB written)" if a.cold else "warm caches"
    clock = "one thread" if a.threads == 1 else f"{a.threads} threads, wall clock"
    isa = f", instruction set {a.isa}" if a.isa else ""
    outliers = ", an outlier (200) a group" if a.outliers else ""
    print(f"# min/median ms, {clock}, {a.dtype} activations{outliers}, {caches}{isa}; a = {a.a}, b = {a.b}")
    for i, case in enumerate(a.cases):
        cells = " | ".join(f"a {results['a'][r][i]} b {results['b'][r][i]}" for r in range(a.rounds))
        print(f"{case:24s} {cells}")


if __name__ == "__main__":
    main()
