"""Codec v2 speed on one CPU core: rANS symbols/s (encode, decode) and codec encode+decode vs memcpy.

    python bench/bench_codec_v2.py --out DIR [--repeats 15]

Symbols come from a config calibrated on Gaussian activations with a few heavy channels at about 4
bits per element, so the table and the escape rate are realistic. The codec throughput is input
bytes (fp16) per second of encode + frame + parse + decode at T = 512, d = 4096, beside the
bandwidth of a plain single-threaded copy of the same fp16 buffer, measured in the same run
(warm-up, then the median of ``--repeats``, in thread CPU time so that a busy shared machine does
not count time spent waiting for a core).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from splitkernels.codec import calibrate, decode, encode, from_bytes, rans


def median_time(fn, repeats: int) -> float:
    """Median CPU time of this thread per call (everything runs on the calling thread): on a shared,
    oversubscribed machine wall time mostly measures waiting for a core, thread CPU time does not."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times)


def activations(t: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g)
    x[:, :8] *= 12.0
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--bits", type=float, default=4.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if rans._C is not None:
        rans._C.set_num_threads(1)
    t, d = 512, 4096
    cfg = calibrate(activations(1024, d, 0), bits=args.bits)
    x = activations(t, d, 1).half()
    enc = encode(x, cfg)
    rows = {}
    for name, n in (("prefill T=512 d=4096", t * d), ("decode T=1 d=576", 576)):
        sym = np.ascontiguousarray(enc.symbols.numpy().ravel()[:n])
        stream = rans.encode(sym, cfg.freqs)
        te = median_time(lambda: rans.encode(sym, cfg.freqs), args.repeats)
        td = median_time(lambda: rans.decode(stream, cfg.freqs, n), args.repeats)
        rows[name] = {"symbols": n, "lanes": rans.lanes(n), "bits_per_symbol": 8 * len(stream) / n,
                      "encode_msym_s": n / te / 1e6, "decode_msym_s": n / td / 1e6}
    src = x.numpy()
    dst = np.empty_like(src)
    t_copy = median_time(lambda: np.copyto(dst, src), args.repeats)
    t_enc = median_time(lambda: encode(x, cfg).to_bytes(), args.repeats)
    data = encode(x, cfg).to_bytes()
    t_dec = median_time(lambda: decode(from_bytes(data, config=cfg)), args.repeats)
    nbytes = x.numel() * x.element_size()
    codec = {"input_bytes": nbytes, "frame_bytes": len(data), "bits_per_element": 8 * len(data) / x.numel(),
             "memcpy_gb_s": nbytes / t_copy / 1e9, "encode_s": t_enc, "decode_s": t_dec,
             "codec_gb_s": nbytes / (t_enc + t_dec) / 1e9}
    codec["ratio_to_memcpy"] = codec["codec_gb_s"] / codec["memcpy_gb_s"]
    result = {"machine": platform.processor() or platform.machine(), "cpu_count": __import__("os").cpu_count(),
              "note": "one thread, thread CPU time; shared machine, timings noisy", "rans": rows, "codec_T512_d4096": codec,
              "cpp_coder": rans._C is not None and hasattr(rans._C, "rans_encode")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "codec_v2_speed.json").write_text(json.dumps(result, indent=1))
    lines = ["| stream | symbols | lanes | bits/symbol | encode M sym/s | decode M sym/s |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['symbols']} | {r['lanes']} | {r['bits_per_symbol']:.3f} | "
                     f"{r['encode_msym_s']:.1f} | {r['decode_msym_s']:.1f} |")
    lines += ["", "| T=512 d=4096 fp16 | memcpy GB/s | codec enc+dec GB/s | ratio | encode ms | decode ms |",
              "|---|---|---|---|---|---|",
              f"| v2 @ {codec['bits_per_element']:.2f} bits | {codec['memcpy_gb_s']:.2f} | {codec['codec_gb_s']:.3f} | "
              f"{codec['ratio_to_memcpy']:.3f} | {t_enc * 1e3:.1f} | {t_dec * 1e3:.1f} |"]
    (out / "codec_v2_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
