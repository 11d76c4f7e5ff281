"""GPU microbenchmarks of the triton backend beside fp16 ``torch.matmul`` and a plain copy, in one run.

* W4 g128 ``lowbit_linear`` at M in {1, 16, 64, 256} on (K, N) = (4096, 4096), (4096, 14336)
  and (14336, 4096), fp16 activations: the dispatched op and each path forced (gemv, tiled,
  dequant with a cold and a warm weight cache), against fp16 ``F.linear`` on the dense weight.
  Targets: >= 3.0x at M = 1 (the bytes limit is 3.88x), >= 2.5x at M = 16, never slower.
* The dispatch crossovers: every path at M in {1, 2, 4, 8, 16, 32, 64, 128, 256} on 4096 x 4096
  for W4 (``--all-bits``: every width); the table is written to ``--out``/dispatch_table.json (``--install-table``
  also copies it to where :mod:`splitkernels.triton.dispatch` picks it up).
* Codec: fused encode and decode at T = 4096, d = 4096 (fp16, default CodecConfig) against the
  copy bandwidth (target >= 70%), and T = 1 encode / decode replayed in a CUDA graph (target
  < 15 us each).
* gemlite / torchao rows only when those packages import.

Times are medians of CUDA-event GPU time per call after warm-up, with L2 flushed before every
call (a large memset in the same stream, which also hides the Python launch overhead). "GB/s"
counts the bytes a kernel must move at least; "of copy" divides by the measured copy bandwidth
(bytes read + written per second by a large ``Tensor.copy_``). Autotuning is on; its cache is
kept in ``--out``/autotune and exported as ``--out``/tuned.json (the format shipped in
splitkernels/triton/tuned/) so the chosen configs come back with the results.

Usage: python bench/bench_triton.py --out DIR [--quick] [--all-bits] [--install-table]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels only

import torch  # noqa: E402
from gpu_timing import Timer, copy_bandwidth  # noqa: E402

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (K in, N out)
HEADLINE_M = (1, 16, 64, 256)
SWEEP_M = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def row(kind: str, name: str, shape: str, m: int | str, t: float, nbytes: int, flops: float,
        copy_bw: float, base: float | None) -> dict:
    return {
        "kind": kind, "name": name, "shape": shape, "M": m, "us": t * 1e6, "GB/s": nbytes / t / 1e9,
        "TFLOP/s": flops / t / 1e12, "of_copy": nbytes / t / copy_bw,
        "speedup": None if base is None else base / t,
    }


def bench_gemm(timer: Timer, copy_bw: float, quick: bool) -> list[dict]:
    from splitkernels import ops, use_backend
    from splitkernels.quant import quantize_weight
    from splitkernels.triton import lowbit_gemm as lg

    rows = []
    for k, n in SHAPES[:1] if quick else SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.float16)
        qw = quantize_weight(w, 4, 128)
        w16 = qw.dequantize(torch.float16)
        shape = f"{k}x{n}"
        for m in HEADLINE_M:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            io = 2 * (m * k + m * n)
            flops = 2.0 * m * n * k
            base = timer(lambda: torch.nn.functional.linear(x, w16))
            rows.append(row("gemm", "fp16 F.linear", shape, m, base, w16.numel() * 2 + io, flops, copy_bw, base))
            packed = qw.nbytes + io
            with use_backend("triton"):
                ops.lowbit_linear(x, qw)  # tune (if new) and compile outside the timing
                t = timer(lambda: ops.lowbit_linear(x, qw))
            rows.append(row("gemm", "triton W4g128 (dispatch)", shape, m, t, packed, flops, copy_bw, base))
            for name, fn in _forced_paths(lg, x, qw, m).items():
                fn()
                rows.append(row("gemm", f"triton W4g128 {name}", shape, m, timer(fn), packed, flops, copy_bw, base))
            rows += _third_party(timer, w, x, shape, m, io, flops, copy_bw, base)
    return rows


def _forced_paths(lg, x, qw, m: int) -> dict[str, Callable[[], object]]:
    args = (x, qw.qweight, qw.scale, qw.zero, qw.bits, qw.group_size, None)
    paths = {}
    if m <= 16:
        cfg = lg.tuned_config("gemv", lg.gemv, lg.GEMV_CONFIGS, *args)
        paths["gemv"] = lambda: lg.gemv(*args, cfg)
    tcfg = lg.tuned_config("tiled", lg.tiled, lg.TILED_CONFIGS, *args)
    paths["tiled"] = lambda: lg.tiled(*args, tcfg)
    k = qw.in_features

    def dequant_cold():
        w = lg.dequantize(qw.qweight, qw.scale, qw.zero, qw.bits, qw.group_size, k, x.dtype)
        return torch.nn.functional.linear(x, w)

    def dequant_warm():
        w = lg.dequant_cache.get(qw.qweight, qw.scale, qw.zero, qw.bits, qw.group_size, k, x.dtype)
        return torch.nn.functional.linear(x, w)

    paths["dequant cold"] = dequant_cold
    paths["dequant warm"] = dequant_warm
    return paths


def _third_party(timer, w, x, shape, m, io, flops, copy_bw, base) -> list[dict]:
    """torchao int4 weight-only rows when torchao imports (errors are reported, not raised)."""
    try:
        import torchao  # noqa: F401
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except ImportError:
        return []
    try:
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda", dtype=torch.bfloat16)
        lin.weight.data.copy_(w)
        quantize_(lin, Int4WeightOnlyConfig(group_size=128))
        xb = x.to(torch.bfloat16)
        t = timer(lambda: lin(xb))
        return [row("gemm", "torchao int4wo g128 (bf16)", shape, m, t, w.numel() // 2 + io, flops, copy_bw, base)]
    except Exception as exc:  # noqa: BLE001 - a third-party failure must not lose our numbers
        return [{"kind": "gemm", "name": "torchao int4wo g128", "shape": shape, "M": m, "error": repr(exc)}]


def sweep_crossovers(timer: Timer, all_bits: bool) -> tuple[dict, list[dict]]:
    """Time every path at 4096 x 4096 over SWEEP_M (W4, or every width); derive the crossovers.

    Widths not swept keep the default table entries.
    """
    from splitkernels.quant import quantize_weight
    from splitkernels.triton import dispatch
    from splitkernels.triton import lowbit_gemm as lg

    entry, raw = {}, []
    for bits in (2, 3, 4, 8) if all_bits else (4,):
        qw = quantize_weight(torch.randn(4096, 4096, device="cuda", dtype=torch.float16), bits, 128)
        best = {}
        for m in SWEEP_M:
            x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
            times = {}
            for name, fn in _forced_paths(lg, x, qw, m).items():
                if name == "dequant warm":
                    continue  # the table must hold even when the cache misses
                fn()
                times[name.split()[0]] = timer(fn)
            best[m] = min(times, key=times.get)
            raw.append({"bits": bits, "M": m, **{f"{p}_us": t * 1e6 for p, t in times.items()}, "best": best[m]})
        gemv_max = max([1] + [m for m in SWEEP_M if all(best[j] == "gemv" for j in SWEEP_M if j <= m)])
        tiled_max = max([gemv_max] + [m for m in SWEEP_M if best[m] in ("gemv", "tiled")])
        entry[str(bits)] = {"gemv_max_m": gemv_max, "tiled_max_m": tiled_max}
    for bits, default in dispatch.DEFAULT_TABLE["gpus"]["default"].items():
        entry.setdefault(bits, default)
    return {"version": dispatch.DEFAULT_TABLE["version"], "gpus": {torch.cuda.get_device_name(): entry}}, raw


def bench_codec(timer: Timer, copy_bw: float) -> list[dict]:
    from splitkernels import ops, use_backend
    from splitkernels.codec import CodecConfig

    cfg = CodecConfig()
    args = (cfg.threshold == "abs", cfg.threshold_value, cfg.capacity, list(cfg.bit_choices), cfg.eps, None)
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.float16, generator=g)
    x[:, torch.randperm(4096, device="cuda", generator=g)[:64]] *= 30
    x[0] *= 50
    copy_t = timer(lambda: x.clone())
    with use_backend("triton"):
        enc = ops.ts_tabq_encode(x, *args)
        buffers = [enc[i] for i in (0, 1, 2, 4, 5, 6, 7)]
        t_enc = timer(lambda: ops.ts_tabq_encode(x, *args))
        t_dec = timer(lambda: ops.ts_tabq_decode(*buffers, 4096))
    small = sum(t.numel() * t.element_size() for t in enc if t.dim() == 1 or t.shape[1] != enc[7].shape[1])
    enc_bytes = x.numel() * 2 + enc[7].numel() + small
    dec_bytes = int(enc[8].sum()) + small + x.numel() * 2
    shape = "T4096 d4096 fp16"
    bits_hist = torch.bincount(enc[0].long(), minlength=17).tolist()
    rows.append(row("codec", "copy (x.clone)", shape, 4096, copy_t, 2 * x.numel() * 2, 0.0, copy_bw, None))
    rows.append(row("codec", "triton encode", shape, 4096, t_enc, enc_bytes, 0.0, copy_bw, copy_t))
    rows.append(row("codec", "triton decode", shape, 4096, t_dec, dec_bytes, 0.0, copy_bw, copy_t))
    rows[-2]["note"] = f"bits histogram {dict((b, c) for b, c in enumerate(bits_hist) if c)}"

    x1 = x[1:2].clone()
    for name, us in _graph_replay_us(x1, args).items():
        rows.append({"kind": "codec", "name": name, "shape": "T1 d4096 fp16", "M": 1, "us": us})
    return rows


def _graph_replay_us(x1: torch.Tensor, args: tuple, replays: int = 200) -> dict[str, float]:
    from splitkernels import ops, use_backend

    out = {}
    with use_backend("triton"):
        enc = ops.ts_tabq_encode(x1, *args)
        buffers = [enc[i] for i in (0, 1, 2, 4, 5, 6, 7)]
        ops.ts_tabq_decode(*buffers, x1.shape[1])
        torch.cuda.synchronize()
        for name, fn in (
            ("triton encode T=1, CUDA graph", lambda: ops.ts_tabq_encode(x1, *args)),
            ("triton decode T=1, CUDA graph", lambda: ops.ts_tabq_decode(*buffers, x1.shape[1])),
        ):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            graph.replay()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(replays):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            out[name] = start.elapsed_time(end) * 1e3 / replays
    return out


def markdown(meta: dict, rows: list[dict], sweep: list[dict]) -> str:
    lines = [
        f"# triton backend on {meta['card']}", "",
        f"torch {meta['torch']}, triton {meta['triton']}; copy bandwidth {meta['copy_GBps']:.0f} GB/s "
        "(read + write). Times: median GPU time per call, L2 flushed.", "",
        "| kind | name | shape | M | us | GB/s | TFLOP/s | of copy | speedup | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} | {r['name']} | {r['shape']} | {r['M']} | | | | | | {r['error']} |")
            continue

        def f(key, fmt):
            return "" if r.get(key) is None else format(r[key], fmt)

        lines.append(
            f"| {r['kind']} | {r['name']} | {r['shape']} | {r['M']} | {f('us', '.1f')} | {f('GB/s', '.0f')} | "
            f"{f('TFLOP/s', '.2f')} | {f('of_copy', '.0%')} | {f('speedup', '.2f')} | {r.get('note', '')} |"
        )
    if sweep:
        lines += ["", "## dispatch sweep (4096 x 4096, us; 'dequant' = cold cache)", "",
                  "| bits | M | gemv | tiled | dequant | best |", "|---|---|---|---|---|---|"]
        for s in sweep:
            lines.append(
                f"| {s['bits']} | {s['M']} | {s.get('gemv_us', float('nan')):.1f} | {s['tiled_us']:.1f} | "
                f"{s['dequant_us']:.1f} | {s['best']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="one GEMM shape and fewer reps")
    parser.add_argument("--all-bits", action="store_true", help="sweep the crossovers for W2/W3/W8 too (slow: compiles)")
    parser.add_argument("--install-table", action="store_true", help="copy the measured dispatch table into use")
    ns = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_triton: no CUDA device, nothing measured", file=sys.stderr)
        return 1
    ns.out.mkdir(parents=True, exist_ok=True)
    os.environ["SPLITKERNELS_CACHE"] = str(ns.out / "autotune")
    # A timeout's SIGTERM unwinds through the saves below instead of losing the finished sections.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))

    import triton

    from splitkernels.triton import autotune_cache, dispatch

    timer = Timer(reps=20 if ns.quick else 50, warmup=3 if ns.quick else 10)
    copy_bw = copy_bandwidth(timer)
    meta = {
        "card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "copy_GBps": copy_bw / 1e9,
    }
    rows: list[dict] = []
    sweep: list[dict] = []

    def save() -> None:
        (ns.out / "bench_triton.json").write_text(json.dumps({"meta": meta, "rows": rows, "sweep": sweep}, indent=1))
        (ns.out / "bench_triton.md").write_text(markdown(meta, rows, sweep))

    try:
        rows += bench_gemm(timer, copy_bw, ns.quick)
        save()
        rows += bench_codec(timer, copy_bw)
        save()
        table, sweep = sweep_crossovers(timer, ns.all_bits)
        (ns.out / "dispatch_table.json").write_text(json.dumps(table, indent=1))
        if ns.install_table:
            dest = dispatch.override_path()
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ns.out / "dispatch_table.json", dest)
    finally:
        save()
        (ns.out / "tuned.json").write_text(json.dumps(autotune_cache.export(meta["card"]), indent=1, sort_keys=True))
    print(markdown(meta, rows, sweep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
