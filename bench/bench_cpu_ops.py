"""CPU microbenchmarks of the cpp backend beside its baselines, in one run on one machine.

* Codec: fused TS + TAB-Q encode and decode (default CodecConfig, fp32 activations with two
  heavy channels and a massive first token) at T in {1, 16, 512}, d in {576, 2048, 4096},
  against the reference ops. Target: encode and decode at T = 512, d = 4096 >= 10x faster.
* lowbit_linear, g128, bits 2/3/4/8, (N, K) in {(4096, 4096), (11008, 4096), (4096, 11008),
  (1536, 576)} (g64 there), M in {1, 8, 64}, fp32 activations, against dense ``F.linear`` in fp32 and
  bf16. Targets: W4 GEMV (M = 1, 4096 x 4096) >= 1.5x faster than fp32 F.linear, W8 >= 1.2x.
* int8_linear on the same shapes against the reference op; pack/unpack against the reference.

Baseline trims: the reference ops are slow (the reference ``lowbit_linear`` -- which *is*
dequantise + matmul: it unpacks and dequantises the weight with torch ops, then calls
F.linear -- takes 1-7 s per call at 11008 x 4096), so each reference op runs once per shape,
without warm-up, and the large codec references once; everything else is a median.

Kernels are called through the backend modules (``splitkernels._backends.cpp`` and
``splitkernels.ops.reference``), not the public op wrappers, so argument checking and
torch.library dispatch are not timed for either. Times are wall-clock medians over
interleaved rounds (candidate and baselines alternate, so background load hits them alike).
"GB/s" counts the bytes an op must move at least (inputs read + outputs written; for the
matmuls the packed weight with its scales and zeros); "of copy" divides by the bandwidth of a
large ``Tensor.copy_`` (bytes read + written per second) measured in the same run.

Writes ``bench_cpu_ops.json`` and ``bench_cpu_ops.md`` to ``--out`` (default bench/out).

Usage: python bench/bench_cpu_ops.py [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import splitkernels
from splitkernels._backends import cpp
from splitkernels.codec import CodecConfig
from splitkernels.ops import reference as ref
from splitkernels.quant import quantize_weight, quantize_weight_int8

CODEC_T = (1, 16, 512)
CODEC_D = (576, 2048, 4096)
MATMUL_NK = ((4096, 4096), (11008, 4096), (4096, 11008), (1536, 576))
MATMUL_M = (1, 8, 64)
WEIGHT_BITS = (2, 3, 4, 8)
GROUP = 128
CLOCK = time.perf_counter  # --clock thread switches to time.thread_time (single-threaded runs)


def compare(fns: dict[str, Callable[[], object]], budget_s: float = 0.6, max_reps: int = 25,
            once: tuple[str, ...] = ()) -> dict[str, float]:
    """Median seconds per call of each fn, measured in interleaved rounds.

    Names in ``once`` (slow references) run in the first round only, without warm-up.
    The number of rounds is sized so the fast fns take about ``budget_s`` in all.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for name, fn in fns.items():
        if name not in once:
            fn()  # warm-up: page faults, OpenMP pool, oneDNN primitive caches
    for name, fn in fns.items():
        start = CLOCK()
        fn()
        times[name].append(CLOCK() - start)
    fast = sum(times[k][0] for k in fns if k not in once)
    reps = max(3, min(max_reps, int(budget_s / max(fast, 1e-6))))
    for _ in range(reps - 1):
        for name, fn in fns.items():
            if name in once:
                continue
            start = CLOCK()
            fn()
            times[name].append(CLOCK() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 256 MiB fp32 copy (median of 7)."""
    src = torch.randn(64 << 20)
    dst = torch.empty_like(src)
    t = compare({"copy": lambda: dst.copy_(src)}, budget_s=1.0, max_reps=7)["copy"]
    return 2 * src.numel() * 4 / t


def activations(t: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g)
    x[:, [d // 7, d // 3]] *= 12
    if t > 1:
        x[0] *= 1000
    return x


def bench_codec(shapes: list[tuple[int, int]], bw: float) -> list[dict]:
    cfg = CodecConfig()
    rows = []
    for t, d in shapes:
        x = activations(t, d, seed=t + d)
        args = (x, False, cfg.alpha, min(cfg.capacity, d), list(cfg.bit_choices), cfg.eps, None)
        enc = cpp.ts_tabq_encode(*args)
        bits, lo, step, _hi, cnt, idx, val, codes, nbytes = enc
        dec_args = (bits, lo, step, cnt, idx, val, codes, d)
        meta = t * (1 + 2 + 2 + 4 + 4) + idx.numel() * 4 + val.numel() * 4
        moved = x.numel() * 4 + int(nbytes.sum()) + meta  # activations, streams, per-token metadata
        slow = 1 if t * d >= 512 * 2048 else 0
        for op, cand, base, a in (
            ("encode", cpp.ts_tabq_encode, ref.ts_tabq_encode, args),
            ("decode", cpp.ts_tabq_decode, ref.ts_tabq_decode, dec_args),
        ):
            r = compare({"cpp": lambda: cand(*a), "reference": lambda: base(*a)},
                        once=("reference",) if slow else ())
            rows.append({
                "op": op, "T": t, "d": d, "cpp_s": r["cpp"], "reference_s": r["reference"],
                "speedup": r["reference"] / r["cpp"], "gbps": moved / r["cpp"] / 1e9,
                "of_copy": moved / r["cpp"] / bw, "bits_per_elem": 8 * int(nbytes.sum()) / (t * d),
            })
            print(f"codec {op:6s} T={t:4d} d={d:5d}  cpp {r['cpp']*1e3:8.3f} ms  ref {r['reference']*1e3:9.2f} ms  "
                  f"x{rows[-1]['speedup']:.1f}", flush=True)
    return rows


def bench_matmul(shapes: list[tuple[int, int]], ms: tuple[int, ...], bits_list: tuple[int, ...], bw: float,
                 with_reference: bool) -> list[dict]:
    rows = []
    for n, k in shapes:
        g = torch.Generator().manual_seed(n + k)
        w = torch.randn(n, k, generator=g)
        w_bf16 = w.bfloat16()
        group = GROUP if k % GROUP == 0 else 64  # K = 576 is 9 groups of 64
        qws = {b: quantize_weight(w, b, group) for b in bits_list}
        w8, s8 = quantize_weight_int8(w)
        for m in ms:
            x = torch.randn(m, k, generator=g)
            x_bf16 = x.bfloat16()
            fns: dict[str, Callable[[], object]] = {
                "F.linear fp32": lambda: torch.nn.functional.linear(x, w),
                "F.linear bf16": lambda: torch.nn.functional.linear(x_bf16, w_bf16),
            }
            for b, q in qws.items():
                fns[f"W{b}"] = (lambda q=q, b=b: cpp.lowbit_linear(x, q.qweight, q.scale, q.zero, b, group, None))
            fns["int8"] = lambda: cpp.int8_linear(x, w8, s8, None)
            once: tuple[str, ...] = ()
            if with_reference:
                fns["int8 reference"] = lambda: ref.int8_linear(x, w8, s8, None)
                once = ("int8 reference",)
                for b, q in qws.items():
                    fns[f"W{b} reference"] = (
                        lambda q=q, b=b: ref.lowbit_linear(x, q.qweight, q.scale, q.zero, b, group, None))
                    once += (f"W{b} reference",)
            r = compare(fns, budget_s=1.5, once=once)
            io = (m * k + m * n) * 4
            moved = {
                "F.linear fp32": w.numel() * 4 + io,
                "F.linear bf16": w.numel() * 2 + (m * k + m * n) * 2,
                "int8": w8.numel() + s8.numel() * 4 + io,
                **{f"W{b}": q.nbytes + io for b, q in qws.items()},
            }
            for name, sec in r.items():
                rows.append({
                    "N": n, "K": k, "M": m, "group": group, "method": name, "seconds": sec,
                    "vs_fp32": r["F.linear fp32"] / sec,
                    "gbps": moved[name] / sec / 1e9 if name in moved else None,
                    "of_copy": moved[name] / sec / bw if name in moved else None,
                })
            line = "  ".join(f"{k_}={v*1e3:.2f}ms" for k_, v in r.items())
            print(f"matmul N={n} K={k} M={m}: {line}", flush=True)
    return rows


def bench_pack(bw: float) -> list[dict]:
    rows = []
    codes_all = torch.randint(0, 256, (512, 4096), dtype=torch.uint8)
    for b in range(1, 9):
        codes = codes_all & ((1 << b) - 1)
        packed = cpp.pack_bits(codes, b)
        for op, cand, base, a in (
            ("pack", cpp.pack_bits, ref.pack_bits, (codes, b)),
            ("unpack", cpp.unpack_bits, ref.unpack_bits, (packed, b, 4096)),
        ):
            r = compare({"cpp": lambda: cand(*a), "reference": lambda: base(*a)}, once=("reference",))
            moved = codes.numel() + packed.numel()
            rows.append({"op": op, "bits": b, "cpp_s": r["cpp"], "reference_s": r["reference"],
                         "speedup": r["reference"] / r["cpp"], "gbps": moved / r["cpp"] / 1e9})
    print("pack/unpack done", flush=True)
    return rows


def machine() -> dict:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "kernel_threads": cpp._C.num_threads(),
        "python": sys.version.split()[0], "splitkernels": splitkernels.__version__,
        "loadavg_start": os.getloadavg(),
    }


def render(result: dict) -> str:
    mc, bw = result["machine"], result["copy_bandwidth_gbps"]
    out = [
        "# CPU kernels (cpp backend) vs baselines",
        "",
        f"Machine: {mc['cpu']}, {mc['logical_cpus']} logical CPUs, torch {mc['torch']} ({mc['torch_threads']} threads), "
        f"kernels with {mc['kernel_threads']} OpenMP threads; clock: {result['clock']}"
        + (" (CPU time of the one calling thread)" if result["clock"] == "thread" else " (wall)")
        + f"; load average at start {mc['loadavg_start'][0]:.1f}, "
        f"at end {result['loadavg_end'][0]:.1f} (shared machine: absolute times are noisy, ratios within a row are "
        f"measured in interleaved rounds). Copy bandwidth (read + write): {bw:.1f} GB/s. Sweep took "
        f"{result['wall_s']:.0f} s.",
        "",
        "## Codec (default CodecConfig, fp32 activations)",
        "",
        "| op | T | d | cpp ms | reference ms | speedup | cpp GB/s | of copy | bits/elem |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["codec"]:
        out.append(f"| {r['op']} | {r['T']} | {r['d']} | {r['cpp_s']*1e3:.3f} | {r['reference_s']*1e3:.2f} | "
                   f"{r['speedup']:.1f}x | {r['gbps']:.2f} | {r['of_copy']:.0%} | {r['bits_per_elem']:.2f} |")
    out += ["", f"## Matmuls (g{GROUP}, g64 where K = 576; fp32 activations; ms, and speedup over fp32 F.linear)", ""]
    methods = []
    for r in result["matmul"]:
        if r["method"] not in methods and "reference" not in r["method"]:
            methods.append(r["method"])
    out.append("| N | K | M | " + " | ".join(methods) + " |")
    out.append("|---|---|---|" + "---|" * len(methods))
    keyed: dict[tuple, dict[str, dict]] = {}
    for r in result["matmul"]:
        keyed.setdefault((r["N"], r["K"], r["M"]), {})[r["method"]] = r
    for (n, k, m), rs in keyed.items():
        cells = [f"{rs[meth]['seconds']*1e3:.2f} ({rs[meth]['vs_fp32']:.2f}x)" for meth in methods]
        out.append(f"| {n} | {k} | {m} | " + " | ".join(cells) + " |")
    refs = [r for r in result["matmul"] if "reference" in r["method"]]
    if refs:
        out += ["", "Reference ops (one run each; the low-bit reference is torch dequantise + F.linear) and the "
                "C++ kernel at the same shape:", "", "| N | K | M | op | reference ms | cpp ms | speedup |",
                "|---|---|---|---|---|---|---|"]
        for r in refs:
            cand = keyed[(r["N"], r["K"], r["M"])][r["method"].replace(" reference", "")]
            out.append(f"| {r['N']} | {r['K']} | {r['M']} | {r['method'].replace(' reference', '')} | "
                       f"{r['seconds']*1e3:.1f} | {cand['seconds']*1e3:.2f} | {r['seconds']/cand['seconds']:.1f}x |")
    gemv = keyed.get((4096, 4096, 1))
    if gemv:
        out += ["", "GB/s at M = 1, 4096 x 4096 (bytes that must move / time):", ""]
        for meth in methods:
            out.append(f"* {meth}: {gemv[meth]['gbps']:.1f} GB/s ({gemv[meth]['of_copy']:.0%} of copy)")
    if result.get("pack"):
        out += ["", "## pack / unpack ([512, 4096] codes)", "", "| op | bits | cpp ms | reference ms | speedup | cpp GB/s |",
                "|---|---|---|---|---|---|"]
        for r in result["pack"]:
            out.append(f"| {r['op']} | {r['bits']} | {r['cpp_s']*1e3:.3f} | {r['reference_s']*1e3:.1f} | "
                       f"{r['speedup']:.0f}x | {r['gbps']:.2f} |")
    out += ["", "## Targets", ""] + [f"* {t}" for t in result["targets"]]
    return "\n".join(out) + "\n"


def targets(result: dict) -> list[str]:
    lines = []
    for r in result["codec"]:
        if r["T"] == 512 and r["d"] == 4096:
            ok = "met" if r["speedup"] >= 10 else "MISSED"
            lines.append(f"codec {r['op']} T=512 d=4096: {r['speedup']:.1f}x faster than the reference (>= 10x: {ok})")
    for r in result["matmul"]:
        if (r["N"], r["K"], r["M"]) == (4096, 4096, 1) and r["method"] in ("W4", "W8"):
            need = 1.5 if r["method"] == "W4" else 1.2
            ok = "met" if r["vs_fp32"] >= need else "MISSED"
            lines.append(f"{r['method']} g{GROUP} GEMV 4096x4096: {r['vs_fp32']:.2f}x fp32 F.linear (>= {need}x: {ok})")
    slower = [r for r in result["codec"] + result.get("pack", []) if r["speedup"] < 1]
    keyed = {(r["N"], r["K"], r["M"], r["method"]): r for r in result["matmul"]}
    for (n, k, m, meth), r in keyed.items():
        if meth.endswith("reference"):
            cand = keyed[(n, k, m, meth.replace(" reference", ""))]
            if cand["seconds"] > r["seconds"]:
                slower.append({**cand, "op": meth})
    lines.append("no C++ op slower than the reference: " + ("met" if not slower else f"CHECK {slower}"))
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    p.add_argument("--quick", action="store_true", help="only the target shapes, no reference low-bit op")
    p.add_argument("--threads", type=int, default=0, help="threads for torch and the kernels (default: all)")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="wall: perf_counter; thread: CPU time of the calling thread (implies --threads 1; "
                        "robust to other processes on a shared machine)")
    a = p.parse_args()
    if a.clock == "thread":
        global CLOCK
        CLOCK = time.thread_time
        a.threads = 1
    if a.threads:
        torch.set_num_threads(a.threads)
        cpp._C.set_num_threads(a.threads)
    start = time.perf_counter()
    result: dict = {"machine": machine(), "clock": a.clock}
    bw = copy_bandwidth()
    result["copy_bandwidth_gbps"] = bw / 1e9
    print(f"copy bandwidth {bw/1e9:.1f} GB/s", flush=True)
    codec_shapes = [(512, 4096)] if a.quick else [(t, d) for t in CODEC_T for d in CODEC_D]
    result["codec"] = bench_codec(codec_shapes, bw)
    if a.quick:
        result["matmul"] = bench_matmul([(4096, 4096)], (1,), (4, 8), bw, with_reference=False)
    else:
        result["matmul"] = bench_matmul(list(MATMUL_NK), MATMUL_M, WEIGHT_BITS, bw, with_reference=True)
        result["pack"] = bench_pack(bw)
    result["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - start
    result["targets"] = targets(result)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench_cpu_ops.json").write_text(json.dumps(result, indent=1))
    table = render(result)
    (a.out / "bench_cpu_ops.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
