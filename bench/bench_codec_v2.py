"""Codec v2 speed on one CPU core: each stage, encode+decode vs memcpy, one-token frames.

    python bench/bench_codec_v2.py --out DIR [--repeats 15]

Symbols come from a config calibrated on Gaussian activations with a few heavy channels at about 4
bits per element, so the table and the escape rate are realistic. Throughput counts input bytes
(fp16) per second of encode (quantise + rANS + frame) plus decode (parse + rANS + dequantise) at
T = 512, d = 4096, beside two single-threaded copies measured in the same run: of the same 4 MiB
tensor (it stays in the last-level cache) and of a 256 MiB buffer (larger than any LLC, so DRAM
bandwidth). Every fused pass runs once per instruction set (scalar fallback and AVX2). Warm-up,
then the median of ``--repeats`` in thread CPU time, so a busy shared machine does not count time
spent waiting for a core.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from splitkernels.codec import calibrate, decode, encode, from_bytes, rans
from splitkernels.codec import v2 as v2mod

BIG_COPY_BYTES = 256 << 20


def median_time(fn, repeats: int) -> float:
    """Median CPU time of this thread per call (everything runs on the calling thread)."""
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


def memcpy_gb_s(nbytes: int, repeats: int) -> float:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    return nbytes / median_time(lambda: np.copyto(dst, src), repeats) / 1e9


def stages(x: torch.Tensor, cfg, repeats: int) -> dict:
    """Milliseconds of each stage and of encode / decode as the runtime calls them."""
    enc = encode(x, cfg)
    data = enc.to_bytes()
    parsed = from_bytes(data, config=cfg)
    coded = np.ascontiguousarray(enc.symbols.numpy().ravel())
    stream = rans.encode(coded, cfg.freqs)
    ms = {
        "encode(): fused quantise": median_time(lambda: encode(x, cfg), repeats),
        "rANS encode": median_time(lambda: rans.encode(coded, cfg.freqs), repeats),
        "frame write (incl. rANS)": median_time(lambda: enc.to_bytes(), repeats),
        "rANS decode": median_time(lambda: rans.decode(stream, cfg.freqs, coded.size), repeats),
        "frame parse (incl. rANS)": median_time(lambda: from_bytes(data, config=cfg), repeats),
        "decode(): fused dequantise": median_time(lambda: decode(parsed), repeats),
        "encode total": median_time(lambda: encode(x, cfg).to_bytes(), repeats),
        "decode total": median_time(lambda: decode(from_bytes(data, config=cfg)), repeats),
    }
    return {k: v * 1e3 for k, v in ms.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (codec_v2_speed.json, codec_v2_speed.md)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--bits", type=float, default=4.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    native = rans.has_native() and v2mod.has_fused()
    isas = rans._C.v2_isas() if native else ["reference"]
    t, d = 512, 4096
    cfg = calibrate(activations(1024, d, 0), bits=args.bits)
    x = activations(t, d, 1).half()
    nbytes = x.numel() * x.element_size()
    frame = encode(x, cfg).to_bytes()
    copy_llc = memcpy_gb_s(nbytes, args.repeats * 4)
    copy_dram = memcpy_gb_s(BIG_COPY_BYTES, max(3, args.repeats // 3))
    result = {"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "note": "one thread, thread CPU time; shared machine (other agents running), timings noisy",
              "native": native, "T": t, "d": d, "input_bytes": nbytes, "frame_bytes": len(frame),
              "bits_per_element": 8 * len(frame) / x.numel(), "memcpy_4MiB_gb_s": copy_llc,
              "memcpy_256MiB_gb_s": copy_dram, "by_isa": {}}
    before = rans._C.v2_isa() if native else None
    for isa in isas:
        if native:
            rans._C.set_v2_isa(isa)
        ms = stages(x, cfg, args.repeats)
        gb_s = nbytes / ((ms["encode total"] + ms["decode total"]) / 1e3) / 1e9
        one = x[:1, :576].contiguous()
        cfg576 = calibrate(activations(1024, 576, 2), bits=args.bits)
        one_frame = encode(one, cfg576).to_bytes()
        tok_enc = median_time(lambda: encode(one, cfg576).to_bytes(), args.repeats * 20)
        tok_dec = median_time(lambda: decode(from_bytes(one_frame, config=cfg576)), args.repeats * 20)
        result["by_isa"][isa] = {"ms": ms, "codec_gb_s": gb_s, "ratio_to_memcpy_4MiB": gb_s / copy_llc,
                                 "ratio_to_memcpy_256MiB": gb_s / copy_dram,
                                 "one_token_d576": {"encode_us": tok_enc * 1e6, "decode_us": tok_dec * 1e6,
                                                    "frame_bytes": len(one_frame)}}
    if native:
        rans._C.set_v2_isa(before)
    sym = np.ascontiguousarray(encode(x, cfg).symbols.numpy().ravel())
    result["rans_msym_s"] = {}
    for name, n in (("T=512 d=4096", t * d), ("T=1 d=576", 576)):
        s = sym[:n]
        stream = rans.encode(s, cfg.freqs)
        te = median_time(lambda: rans.encode(s, cfg.freqs), args.repeats * (1 if n > 576 else 20))
        td = median_time(lambda: rans.decode(stream, cfg.freqs, n), args.repeats * (1 if n > 576 else 20))
        result["rans_msym_s"][name] = {"symbols": n, "lanes": rans.lanes(n), "encode": n / te / 1e6,
                                       "decode": n / td / 1e6}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "codec_v2_speed.json").write_text(json.dumps(result, indent=1))
    lines = [f"T={t} d={d} fp16 ({nbytes / 2**20:.0f} MiB), frame {result['bits_per_element']:.2f} bits/element; "
             f"memcpy one thread: {copy_llc:.1f} GB/s (same 4 MiB tensor, cache-resident), "
             f"{copy_dram:.1f} GB/s (256 MiB, beyond the LLC)", "",
             "| ISA | " + " | ".join(next(iter(result["by_isa"].values()))["ms"]) + " |",
             "|---|" + "---|" * len(next(iter(result["by_isa"].values()))["ms"])]
    for isa, r in result["by_isa"].items():
        lines.append(f"| {isa} | " + " | ".join(f"{v:.2f} ms" for v in r["ms"].values()) + " |")
    lines += ["", "| ISA | codec enc+dec GB/s | vs memcpy 4 MiB | vs memcpy 256 MiB | 1-token d=576 encode us | "
              "1-token decode us |", "|---|---|---|---|---|---|"]
    for isa, r in result["by_isa"].items():
        o = r["one_token_d576"]
        lines.append(f"| {isa} | {r['codec_gb_s']:.3f} | {100 * r['ratio_to_memcpy_4MiB']:.1f}% | "
                     f"{100 * r['ratio_to_memcpy_256MiB']:.1f}% | {o['encode_us']:.0f} | {o['decode_us']:.0f} |")
    lines += ["", "| rANS stream | symbols | lanes | encode M sym/s | decode M sym/s |", "|---|---|---|---|---|"]
    for name, r in result["rans_msym_s"].items():
        lines.append(f"| {name} | {r['symbols']} | {r['lanes']} | {r['encode']:.0f} | {r['decode']:.0f} |")
    (out / "codec_v2_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
