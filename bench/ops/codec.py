"""Codec encode / decode (fused TS + TAB-Q) on the CPU, as a fraction of memory-copy bandwidth.

For each (T, d), in the same process and in interleaved rounds: the backend's
``ts_tabq_encode`` and ``ts_tabq_decode`` (public ops under ``--backend``) and the reference
ops, default CodecConfig, fp32 activations with two heavy channels and a massive first token.
"of copy" = (bytes read + written: activations, streams, per-token metadata) / time / the
bandwidth of a large ``Tensor.copy_`` measured in the same run (the honest yardstick for a
streaming op); "speedup" = reference time / backend time.

Usage: python bench/ops/codec.py --out DIR [--backend cpp] [--tokens 1,16,512] [--dims 576,2048,4096]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timing  # noqa: E402  (bench/timing.py)

import splitkernels  # noqa: E402
from splitkernels import ops  # noqa: E402
from splitkernels.codec import CodecConfig  # noqa: E402
from splitkernels.ops import reference as ref  # noqa: E402


def activations(t: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g)
    x[:, [d // 7, d // 3]] *= 12
    if t > 1:
        x[0] *= 1000
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "out" / "ops")
    p.add_argument("--backend", default="cpp")
    p.add_argument("--tokens", default="1,16,512")
    p.add_argument("--dims", default="576,2048,4096")
    p.add_argument("--budget", type=float, default=0.5)
    a = p.parse_args()
    start = time.perf_counter()
    result, bw = timing.new_result(a.backend)
    cfg = CodecConfig()
    for t in (int(v) for v in a.tokens.split(",")):
        for d in (int(v) for v in a.dims.split(",")):
            x = activations(t, d, seed=t + d)
            args = (x, False, cfg.alpha, min(cfg.capacity, d), list(cfg.bit_choices), cfg.eps, None)
            enc = ref.ts_tabq_encode(*args)
            bits, lo, step, _hi, cnt, idx, val, codes, nbytes = enc
            dec = (bits, lo, step, cnt, idx, val, codes, d)
            meta = t * (1 + 2 + 2 + 4 + 4) + idx.numel() * 4 + val.numel() * 4
            moved = x.numel() * 4 + int(nbytes.sum()) + meta
            with splitkernels.use_backend(a.backend):
                r = timing.compare({
                    "encode": lambda: ops.ts_tabq_encode(*args), "encode reference": lambda: ref.ts_tabq_encode(*args),
                    "decode": lambda: ops.ts_tabq_decode(*dec), "decode reference": lambda: ref.ts_tabq_decode(*dec),
                }, budget_s=a.budget, min_reps=3)
            for op in ("encode", "decode"):
                s = r[op]["median"]
                result["rows"].append({"op": op, "T": t, "d": d, "seconds": s, "reference_s": r[f"{op} reference"]["median"],
                                       "speedup": r[f"{op} reference"]["median"] / s, "gbps": moved / s / 1e9,
                                       "of_copy": moved / s / bw, "bits_per_elem": 8 * int(nbytes.sum()) / (t * d)})
            timing.progress(f"T={t} d={d}: encode {r['encode']['median']*1e3:.3f} ms, decode {r['decode']['median']*1e3:.3f} ms")
    result["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - start
    mc = result["machine"]
    lines = [
        "# Codec (CPU): encode / decode against copy bandwidth", "",
        f"Machine: {mc['cpu']}, {mc['logical_cpus']} logical CPUs, torch {mc['torch']}; backend `{a.backend}`; copy "
        f"bandwidth (read + write) {bw/1e9:.1f} GB/s; load average {mc['loadavg_start'][0]:.1f} at start, "
        f"{result['loadavg_end'][0]:.1f} at end (shared machine: compare within a row). Medians of interleaved rounds.", "",
        "| op | T | d | ms | reference ms | speedup | GB/s | of copy | bits/elem |", "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['op']} | {r['T']} | {r['d']} | {r['seconds']*1e3:.3f} | {r['reference_s']*1e3:.2f} | "
                     f"{r['speedup']:.1f}x | {r['gbps']:.2f} | {r['of_copy']:.0%} | {r['bits_per_elem']:.2f} |")
    timing.write(a.out, "codec", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
