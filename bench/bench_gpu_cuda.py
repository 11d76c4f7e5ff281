"""GPU microbenchmarks of the cuda backend beside its baselines, in one run on one card.

* Codec: fused TS + TAB-Q encode, decode and encode+decode at T = 4096, d = 4096 (fp16 and
  bf16, default CodecConfig), against the reference ops and the triton backend.
  Target: encode+decode at >= 70% of the measured device-to-device copy bandwidth.
* Codec step: T = 1 encode + decode replayed in a CUDA graph (the per-token cost at decode time).
* GEMV: W4 g128 on (N, K) = (4096, 4096), (4096, 14336) and (14336, 4096) at M = 1, 2, 4, 8,
  16, 32 (the fused kernel's last, two passes of 16 tokens) and 64 (dequantise + matmul), fp16
  activations, against cuBLAS fp16 (``F.linear`` on the fp16 weight) in the same run (issue #13
  targets: >= 3x and >= 70% of HBM peak at M = 1, >= 2.5x at M = 16, never slower). At M < 5
  also the tensor-core kernel the launcher keeps for M >= 5; the triton backend at M = 1;
  W2/W3/W8 at 4096^2; SmolLM2-135M's narrow layers (576 <-> 1536, groups 64 and 32), where the
  rows alone give few warps.

Times are medians of GPU time from CUDA events around each call, after warm-up, with L2
flushed before every call (a large memset in the same stream; it also hides the Python launch
overhead, so the numbers are kernel times). "GB/s" counts the bytes a kernel must move at
least (GEMV: packed weight + scales + zeros, or the fp16 weight, plus activations in and out);
"of copy" divides by the measured copy bandwidth (bytes read + written per second of a large
``Tensor.copy_``), "of peak" by the card's HBM peak from its data sheet (``--hbm-peak`` for
cards not listed). Writes ``bench_gpu_cuda.json`` and ``bench_gpu_cuda.md`` to ``--out``.

Usage: python bench/bench_gpu_cuda.py --out DIR [--quick] [--hbm-peak GBPS]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import splitkernels
from splitkernels import ops
from splitkernels.codec import CodecConfig
from splitkernels.quant import quantize_weight

from gpu_timing import Timer, copy_bandwidth


def backends_on_gpu() -> list[str]:
    info = splitkernels.backends()
    return [n for n in ("cuda", "triton") if info[n]["available"] and "cuda" in info[n]["devices"]]


# HBM peak (bytes/s) of the data sheets, by a substring of torch.cuda.get_device_name().
HBM_PEAK = {"H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12,
            "A100-SXM4-40GB": 1.555e12, "A100-PCIE-40GB": 1.555e12, "A100 80GB PCIe": 1.935e12, "L40S": 0.864e12}


def hbm_peak(card: str) -> float | None:
    return next((bw for name, bw in HBM_PEAK.items() if name in card), None)


def start_cuda_bench(name: str, out: Path) -> tuple[dict, float | None] | None:
    """The environment and HBM peak (bytes/s) for a benchmark of the cuda backend writing to `out`
    (created), or None, with the reason on stderr, where no CUDA device or cuda backend exists."""
    if not torch.cuda.is_available() or not splitkernels.backends()["cuda"]["available"]:
        print(f"{name}: needs a CUDA device and the cuda backend", file=sys.stderr)
        return None
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    return env, hbm_peak(env["card"])


def row(kind: str, shape: str, impl: str, seconds: float, nbytes: int, copy_bw: float, base: float | None,
        peak: float | None = None) -> dict:
    return {
        "bench": kind, "shape": shape, "impl": impl, "us": seconds * 1e6, "GB/s": nbytes / seconds / 1e9,
        "of_copy": nbytes / seconds / copy_bw, "of_peak": nbytes / seconds / peak if peak else None,
        "speedup": (base / seconds) if base else None,
    }


def bench_codec(timer: Timer, copy_bw: float, t: int, d: int, dtype: torch.dtype) -> list[dict]:
    cfg = CodecConfig()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(t, d, device="cuda", dtype=torch.float32, generator=gen)
    x[:, 7] *= 12  # a heavy channel, as in real hidden states
    x[0, 3] = 20000.0  # and an attention-sink token
    x = x.to(dtype)
    args = (False, cfg.alpha, cfg.capacity, list(cfg.bit_choices), cfg.eps)
    rows, shape = [], f"T={t} d={d} {str(dtype).replace('torch.', '')}"
    times: dict[str, dict[str, float]] = {}
    for impl in ["reference"] + backends_on_gpu():
        with splitkernels.use_backend(impl):
            enc = ops.ts_tabq_encode(x, *args)
            bits, lo, step, _hi, cnt, idx, val, codes, nbytes = enc
            te = timer(lambda: ops.ts_tabq_encode(x, *args))
            td = timer(lambda: ops.ts_tabq_decode(bits, lo, step, cnt, idx, val, codes, d))
            times[impl] = {"encode": te, "decode": td, "encode+decode": te + td}
        enc_bytes = x.numel() * x.element_size() + codes.numel() + idx.numel() * 4 + val.numel() * val.element_size()
        dec_bytes = int(nbytes.sum()) + x.numel() * x.element_size() + idx.numel() * 4 + val.numel() * val.element_size()
        sizes = {"encode": enc_bytes, "decode": dec_bytes, "encode+decode": enc_bytes + dec_bytes}
        for op in ("encode", "decode", "encode+decode"):
            base = times["reference"][op]
            rows.append(row(f"codec {op}", shape, impl, times[impl][op], sizes[op], copy_bw, base))
    return rows


def bench_codec_step(timer: Timer, copy_bw: float, d: int) -> list[dict]:
    """T = 1 (one decode step) encode and decode, replayed in a CUDA graph: launch latency bound."""
    cfg = CodecConfig()
    x = torch.randn(1, d, device="cuda", dtype=torch.float16)
    args = (False, cfg.alpha, cfg.capacity, list(cfg.bit_choices), cfg.eps)
    rows = []
    for impl in backends_on_gpu():
        with splitkernels.use_backend(impl):
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up (autotuning, allocations) outside the graph
                    enc = ops.ts_tabq_encode(x, *args)
                    ops.ts_tabq_decode(*enc[:3], *enc[4:8], d)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    enc = ops.ts_tabq_encode(x, *args)
                    ops.ts_tabq_decode(*enc[:3], *enc[4:8], d)
                seconds = timer(graph.replay)
                rows.append(row("codec step (graph)", f"T=1 d={d} float16", impl, seconds, 4 * d, copy_bw, None))
            except Exception as exc:  # a backend that cannot be captured is a result, not a crash
                rows.append({"bench": "codec step (graph)", "shape": f"T=1 d={d}", "impl": impl, "error": repr(exc)})
    return rows


def bench_gemv(timer: Timer, copy_bw: float, peak: float | None, n: int, k: int, bits: int, group: int,
               ms: tuple[int, ...], triton_at_m1: bool) -> list[dict]:
    """fp16 x [M, K] against one N x K weight: cuBLAS fp16 (F.linear), then ours, per M."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    w = torch.randn(n, k, device="cuda", generator=gen)
    qw = quantize_weight(w, bits, group, dtype=torch.float16)
    w16 = w.half()
    del w
    impls = backends_on_gpu()
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
        shape = f"M={m} N={n} K={k} W{bits} g{group}"
        io = x.numel() * 2 + m * n * 2
        base = timer(lambda: F.linear(x, w16))
        rows.append(row("gemv", shape, "cuBLAS fp16 F.linear", base, w16.numel() * 2 + io, copy_bw, base, peak))
        for impl in impls:
            if impl == "triton" and not (triton_at_m1 and m == 1):
                continue  # its first call per shape compiles: kept to the headline shapes
            with splitkernels.use_backend(impl):
                ops.lowbit_linear(x, qw)
                seconds = timer(lambda: ops.lowbit_linear(x, qw))
            rows.append(row("gemv", shape, impl, seconds, qw.nbytes + io, copy_bw, base, peak))
            if impl == "cuda" and m < 5 and bits == 4 and group % 128 == 0:
                # Below M = 5 the launcher picks the CUDA-core kernel; the tensor-core one beside it.
                seconds = time_with_tc_from_m1(timer, lambda: ops.lowbit_linear(x, qw))
                rows.append(row("gemv", shape, "cuda, tensor cores", seconds, qw.nbytes + io, copy_bw, base, peak))
    return rows


def time_with_tc_from_m1(timer: Timer, fn) -> float:
    """fn's time with the cuda backend's tensor-core GEMV taking every M (its threshold restored after)."""
    from splitkernels._backends import cuda as glue

    old = glue._C.gemv_tc_min_m(1)
    glue._GEMV_SPLITS.clear()  # split counts depend on the kernel
    glue._GEMV_FUSED.clear()
    try:
        with splitkernels.use_backend("cuda"):
            fn()
            return timer(fn)
    finally:
        glue._C.gemv_tc_min_m(old)
        glue._GEMV_SPLITS.clear()
        glue._GEMV_FUSED.clear()


def environment() -> dict:
    from splitkernels._native import load

    mod, reason = load("_C_cuda")
    props = torch.cuda.get_device_properties(0)
    return {
        "card": torch.cuda.get_device_name(0),
        "sm": f"{props.major}.{props.minor}",
        "sms": props.multi_processor_count,
        "hbm_peak_GBps": (hbm_peak(torch.cuda.get_device_name(0)) or 0) / 1e9 or None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "splitkernels_C_cuda": mod.version_string() if mod else reason,
        "python": platform.python_version(),
        "backends": {k: v["available"] for k, v in splitkernels.backends().items()},
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def markdown(env: dict, copy_bw: float, rows: list[dict]) -> str:
    lines = [
        f"# cuda backend microbenchmarks on {env['card']} (sm {env['sm']})",
        "",
        f"torch {env['torch']} (CUDA {env['torch_cuda']}), splitkernels._C_cuda: {env['splitkernels_C_cuda']}, "
        f"{env['when']}. Measured device-to-device copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write).",
        "Median GPU time per call, L2 flushed before each call. Speedup: against the first row of the "
        "same shape (the reference op for the codec, cuBLAS fp16 F.linear for GEMV). HBM peak: "
        f"{env['hbm_peak_GBps'] or 'unknown'} GB/s.",
        "",
        "| bench | shape | impl | us | GB/s | of copy BW | of HBM peak | speedup |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['bench']} | {r['shape']} | {r['impl']} | failed: {r['error'][:80]} | | | | |")
            continue
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else ""
        of_peak = f"{100 * r['of_peak']:.0f}%" if r.get("of_peak") else ""
        lines.append(f"| {r['bench']} | {r['shape']} | {r['impl']} | {r['us']:.1f} | {r['GB/s']:.0f} | "
                     f"{100 * r['of_copy']:.0f}% | {of_peak} | {speed} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON and markdown results")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and shapes")
    parser.add_argument("--gemv-only", action="store_true", help="skip the codec benchmarks")
    parser.add_argument("--hbm-peak", type=float, default=None, help="HBM peak in GB/s for a card not in HBM_PEAK")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu_cuda: no CUDA device, nothing to measure", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    timer = Timer(reps=20 if args.quick else 50, warmup=3 if args.quick else 10)
    env = environment()
    print(json.dumps(env, indent=1), flush=True)
    copy_bw = copy_bandwidth(timer)
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s", flush=True)
    rows: list[dict] = []

    def save() -> str:  # after every case, so a run cut short still leaves its numbers
        result = {"environment": env, "copy_GBps": copy_bw / 1e9, "rows": rows}
        (args.out / "bench_gpu_cuda.json").write_text(json.dumps(result, indent=1))
        table = markdown(env, copy_bw, rows)
        (args.out / "bench_gpu_cuda.md").write_text(table)
        return table

    if not args.gemv_only:
        for dtype in (torch.float16,) if args.quick else (torch.float16, torch.bfloat16):
            rows += bench_codec(timer, copy_bw, 4096, 4096, dtype)
            print(f"codec {dtype} done", flush=True)
        rows += bench_codec_step(timer, copy_bw, 4096)
        save()
    if args.hbm_peak:
        env["hbm_peak_GBps"] = args.hbm_peak
    peak = env["hbm_peak_GBps"] * 1e9 if env["hbm_peak_GBps"] else None
    all_m = (1, 2, 4, 8, 16, 32, 64)
    # (N, K, bits, group, Ms, triton at M = 1)
    gemv_cases = [(4096, 4096, 4, 128, all_m, True), (4096, 14336, 4, 128, all_m, True),
                  (14336, 4096, 4, 128, all_m, True), (576, 1536, 4, 64, (1, 16), False),
                  (1536, 576, 4, 64, (1, 16), False), (576, 1536, 4, 32, (1,), False)]
    gemv_cases += [(4096, 4096, b, 128, (1,) if args.quick else (1, 16), False) for b in (2, 3, 8)]
    for i, (n, k, bits, group, ms, triton_at_m1) in enumerate(gemv_cases):
        triton_at_m1 = triton_at_m1 and (i == 0 or not args.quick)  # triton compiles per shape: once in --quick
        rows += bench_gemv(timer, copy_bw, peak, n, k, bits, group, ms, triton_at_m1)
        save()
        print(f"gemv N={n} K={k} W{bits} g{group} done", flush=True)
    print(save())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
