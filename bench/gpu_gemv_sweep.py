"""The cuda backend's decode GEMV over its tuning space, beside cuBLAS, in one run on one card.

For each W4 g128 shape (N x K), activation dtype and M, times cuBLAS (``F.linear`` on the dense
weight of the activations' dtype), the launcher's own choice (``ops.lowbit_linear``), and every
(kernel, variant, split count) the launcher could take: the CUDA-core kernel (at M = 1 also with
the next step's loads issued before the current step's arithmetic) and the tensor-core kernel,
at 1-16 K splits. Each
configuration's output is checked against the launcher's (relative error within one ulp of the
dtype) before it is timed. It exists because the first Nsight Compute profile of the M = 1 GEMV
(H200, 2026-12-04) found it issue-bound at 0.65 waves: whether more splits, more loads in flight
or an overlapped prefetch pay is a measurement, not a guess.

Times: medians of CUDA-event GPU time after a read flush of L2 (``gpu_timing.Timer``). "of HBM"
divides the bytes a kernel must move (packed weight, scales, zeros, activations in and out) per
second by the card's HBM peak. Writes ``gpu_gemv_sweep.json`` and ``gpu_gemv_sweep.md`` to ``--out``.

Usage: python bench/gpu_gemv_sweep.py --out DIR [--shapes 4096x4096,...] [--m 1,2,4,8,16] [--quick]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import splitkernels
from splitkernels import ops
from splitkernels.quant import quantize_weight

from bench_gpu_cuda import start_cuda_bench
from gpu_timing import Timer

SPLITS = (1, 2, 3, 4, 6, 8, 12, 16)
TOL = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def normalised_splits(k: int, want: int, granule: int) -> int:
    """The split count the launcher turns a request into (lowbit_gemv.cuh: gemv_split); splits are
    multiples of `granule` 32-code chunks (32 on CUDA cores, 8 on tensor cores)."""
    chunks = k // 32
    per = -(-chunks // want)
    per = max(1, -(-per // granule) * granule)
    return 1 if chunks == 0 else -(-chunks // per)


def configs(m: int, k: int, c) -> list[tuple[str, int, int, int]]:
    """(kernel, tc_min_m, variant, splits) for every configuration that can take an M-token product."""
    out = []
    cc_variants = [0, c.VARIANT_CC_PREFETCH] if m == 1 else [0]
    if m <= 16:
        for s in sorted({normalised_splits(k, s, 32) for s in SPLITS}):
            out += [("cuda cores", 33, v, s) for v in cc_variants]
    for s in sorted({normalised_splits(k, s, 8) for s in SPLITS}):
        out.append(("tensor cores", 1, 0, s))
    return out


def variant_name(kernel: str, variant: int, c) -> str:
    return kernel + (" (prefetch)" if variant & c.VARIANT_CC_PREFETCH else "")


def launch(c, glue, x: torch.Tensor, qw, splits: int) -> torch.Tensor:
    """One GEMV launch with an explicit split count on the current tc_min_m and variant."""
    m, k = x.shape
    n = qw.qweight.shape[0]
    dtype = glue.DTYPE_CODE[x.dtype]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    partial = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else None
    done = torch.zeros(-(-n // c.GEMV_TILE_ROWS), dtype=torch.int32, device=x.device) if splits > 1 else None
    c.lowbit_gemv(x.data_ptr(), qw.qweight.data_ptr(), qw.scale.data_ptr(), qw.zero.data_ptr(), 0, y.data_ptr(), dtype,
                  m, n, k, qw.bits, qw.group_size, splits, 0 if partial is None else partial.data_ptr(),
                  0 if done is None else done.data_ptr(), glue._stream(x.device))
    return y


def sweep_case(timer: Timer, peak: float | None, n: int, k: int, m: int, dtype: torch.dtype,
               launcher_only: bool = False) -> list[dict]:
    from splitkernels._backends import cuda as glue

    c = glue._C
    gen = torch.Generator(device="cuda").manual_seed(n + k + m)
    w = torch.randn(n, k, device="cuda", generator=gen)
    qw = quantize_weight(w, 4, 128, dtype=dtype)
    dense = w.to(dtype)
    del w
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
    shape = f"M={m} N={n} K={k} W4 g128 {str(dtype).removeprefix('torch.')}"
    low_bytes = qw.nbytes + x.numel() * x.element_size() + m * n * x.element_size()

    def row(impl: str, seconds: float, nbytes: int, splits: int | None = None, err: float | None = None) -> dict:
        return {"shape": shape, "n": n, "k": k, "m": m, "dtype": str(dtype), "impl": impl, "splits": splits,
                "us": seconds * 1e6, "GB/s": nbytes / seconds / 1e9,
                "of_hbm": nbytes / seconds / peak if peak else None, "rel_err": err}

    rows = [row("cuBLAS F.linear", timer(lambda: F.linear(x, dense)), dense.numel() * dense.element_size())]
    with splitkernels.use_backend("cuda"):
        want = ops.lowbit_linear(x, qw)
        rows.append(row("launcher", timer(lambda: ops.lowbit_linear(x, qw)), low_bytes,
                        glue._C.gemv_splits(m, n, k, 4, 128, glue.DTYPE_CODE[dtype])))
    old_min_m, old_variant = c.gemv_tc_min_m(0), c.gemv_variant(-1)
    try:
        for kernel, min_m, variant, splits in [] if launcher_only else configs(m, k, c):
            c.gemv_tc_min_m(min_m)
            c.gemv_variant(variant)
            got = launch(c, glue, x, qw, splits)
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            name = variant_name(kernel, variant, c)
            if not err <= TOL[dtype]:
                rows.append({**row(name, float("nan"), low_bytes, splits, err), "error": "wrong result"})
                continue
            rows.append(row(name, timer(lambda: launch(c, glue, x, qw, splits)), low_bytes, splits, err))
    finally:
        c.gemv_tc_min_m(old_min_m)
        c.gemv_variant(old_variant)
    return rows


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# cuda GEMV tuning sweep on {env['card']} (sm {env['sm']}), {env['when']}", "",
             f"torch {env['torch']} (CUDA {env['torch_cuda']}). Median GPU us per call, L2 flushed (read). "
             "Per case: cuBLAS on the dense weight, the launcher's choice, then the best split count of "
             "each kernel variant (all split counts in the JSON).", "",
             "| case | impl | splits | us | x cuBLAS | of HBM |", "|---|---|---:|---:|---:|---:|"]
    cases: dict[str, list[dict]] = {}
    for r in rows:
        cases.setdefault(r["shape"], []).append(r)
    for shape, rs in cases.items():
        base = rs[0]["us"]
        best: dict[str, dict] = {}
        for r in rs:
            if "error" in r:
                lines.append(f"| {shape} | {r['impl']} | {r['splits']} | wrong result (rel err {r['rel_err']:.2e}) | | |")
                continue
            if r["impl"] not in best or r["us"] < best[r["impl"]]["us"]:
                best[r["impl"]] = r
        for r in best.values():
            hbm = f"{100 * r['of_hbm']:.0f}%" if r["of_hbm"] else ""
            lines.append(f"| {shape} | {r['impl']} | {r['splits'] or ''} | {r['us']:.1f} | {base / r['us']:.2f}x | {hbm} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for the JSON and markdown results")
    ap.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096", help="comma-separated NxK")
    ap.add_argument("--m", default="1,2,4,8,16", help="comma-separated token counts (fp16; bf16 at M = 1)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--launcher-only", action="store_true", help="time cuBLAS and the launcher's choice only")
    args = ap.parse_args()
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        ms = [int(v) for v in args.m.split(",")]
    except ValueError:
        raise SystemExit("--shapes takes NxK items and --m integers, comma-separated")
    if any(len(s) != 2 or s[0] < 1 or s[1] < 128 or s[1] % 128 for s in shapes) or any(not 1 <= v <= 32 for v in ms):
        raise SystemExit("--shapes: N >= 1 and K a positive multiple of 128; --m: 1..32")
    started = start_cuda_bench("gpu_gemv_sweep", args.out)
    if started is None:
        return 1
    env, peak = started
    timer = Timer(reps=20 if args.quick else 50, warmup=3)
    rows: list[dict] = []
    start = time.time()
    cases = [(n, k, m, torch.float16) for n, k in shapes for m in ms]
    cases += [(n, k, 1, torch.bfloat16) for n, k in shapes]
    for i, (n, k, m, dtype) in enumerate(cases):
        rows += sweep_case(timer, peak, n, k, m, dtype, args.launcher_only)
        (args.out / "gpu_gemv_sweep.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
        (args.out / "gpu_gemv_sweep.md").write_text(markdown(env, rows))
        print(f"[{i + 1}/{len(cases)}] N={n} K={k} M={m} {dtype} ({time.time() - start:.0f} s)", flush=True)
    print(markdown(env, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
