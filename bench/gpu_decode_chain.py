"""Decode-time matmuls as a model runs them: a chain of W4 layers replayed in one CUDA graph, beside
cuBLAS fp16 on the same shapes, in one run on one card.

A single GEMV timed after an L2 flush carries a fixed cost of its own (cold TLB and L2, launch,
one warp's critical path): on an H200 both cuBLAS and the cuda backend's GEMV showed about 7-9
us of it (2026-12-04, bench/results/gpu-20261204), which caps any speedup at 4096 x 4096. In a
model, layers follow each other on one stream and those costs overlap. This benchmark captures
``--layers`` decoder layers of Llama-3-8B's linear shapes (q, k, v, o, gate, up, down; 7 matmuls a
layer, W4 g128 with fp16 activations) into one CUDA graph per implementation and M, replays it,
and reports the median GPU time per replay (CUDA events), per matmul, and the weight bytes moved
per second against the card's HBM peak. The weights of the chain are several times L2, so each
replay reads them from HBM. Writes ``gpu_decode_chain.json`` and ``gpu_decode_chain.md`` to ``--out``.

Usage: python bench/gpu_decode_chain.py --out DIR [--layers 2] [--m 1,4,16]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

import splitkernels
from splitkernels import ops
from splitkernels.quant import quantize_weight

from bench_gpu_cuda import start_cuda_bench

# (N, K) of one Llama-3-8B decoder layer's linears: q, k, v, o, gate, up, down.
LAYER = ((4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336))


def replay_seconds(graph: torch.cuda.CUDAGraph, reps: int) -> float:
    """Median GPU seconds of one replay (CUDA events), after three warm-up replays."""
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times)


def capture(calls) -> torch.cuda.CUDAGraph:
    """One graph of all `calls`, each run once eagerly first (kernel loads, allocator warm-up)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    return graph


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for the JSON and markdown results")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers in the chain (1..8)")
    ap.add_argument("--m", default="1,4,16", help="comma-separated token counts (1..32)")
    ap.add_argument("--reps", type=int, default=50, help="timed replays per graph")
    args = ap.parse_args()
    try:
        ms = [int(v) for v in args.m.split(",")]
    except ValueError:
        raise SystemExit("--m takes comma-separated integers")
    if not 1 <= args.layers <= 8 or any(not 1 <= m <= 32 for m in ms) or args.reps < 1:
        raise SystemExit("--layers must be in 1..8, --m values in 1..32, --reps >= 1")
    started = start_cuda_bench("gpu_decode_chain", args.out)
    if started is None:
        return 1
    env, peak = started
    from splitkernels._backends import cuda as glue

    gen = torch.Generator(device="cuda").manual_seed(3)
    shapes = list(LAYER) * args.layers
    dense, low = [], []
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda", generator=gen)
        low.append(quantize_weight(w, 4, 128, dtype=torch.float16))
        dense.append(w.half())
        del w
    dense_bytes = sum(w.numel() * 2 for w in dense)
    low_bytes = sum(q.nbytes for q in low)
    rows = []
    for m in ms:
        xs = {k: torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen) for k in {k for _, k in shapes}}
        impls = {"cuBLAS fp16 F.linear": ([lambda w=w, k=w.shape[1]: F.linear(xs[k], w) for w in dense], dense_bytes, 0)}
        ours = [lambda q=q: ops.lowbit_linear(xs[q.in_features], q) for q in low]
        impls["ours (launcher)"] = (ours, low_bytes, 0)
        if m == 1:
            impls["ours, CUDA cores with prefetch"] = (ours, low_bytes, glue._C.VARIANT_CC_PREFETCH)
        base = None
        for name, (calls, nbytes, variant) in impls.items():
            old = glue._C.gemv_variant(variant)
            try:
                with splitkernels.use_backend("cuda"):
                    seconds = replay_seconds(capture(calls), args.reps)
            finally:
                glue._C.gemv_variant(old)
            base = base or seconds
            rows.append({"m": m, "impl": name, "layers": args.layers, "matmuls": len(shapes), "us": seconds * 1e6,
                         "us_per_matmul": seconds * 1e6 / len(shapes), "weight_GBps": nbytes / seconds / 1e9,
                         "of_hbm": nbytes / seconds / peak if peak else None, "speedup": base / seconds})
            print(f"M={m} {name}: {seconds * 1e6:.1f} us per replay", flush=True)
        (args.out / "gpu_decode_chain.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    lines = [f"# Decode chain on {env['card']}: {args.layers} Llama-3-8B layers ({len(shapes)} matmuls) in one "
             f"CUDA graph, {env['when']}", "",
             f"torch {env['torch']} (CUDA {env['torch_cuda']}). Weights: fp16 {dense_bytes / 1e6:.0f} MB, W4 g128 "
             f"{low_bytes / 1e6:.0f} MB. Median GPU time per replay (CUDA events).", "",
             "| M | impl | us per replay | us per matmul | weight GB/s | of HBM | x cuBLAS |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        hbm = f"{100 * r['of_hbm']:.0f}%" if r["of_hbm"] else ""
        lines.append(f"| {r['m']} | {r['impl']} | {r['us']:.1f} | {r['us_per_matmul']:.2f} | {r['weight_GBps']:.0f} | "
                     f"{hbm} | {r['speedup']:.2f}x |")
    table = "\n".join(lines) + "\n"
    (args.out / "gpu_decode_chain.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
