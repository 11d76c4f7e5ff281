"""Codec v2 on a GPU: the fused device pass of each GPU backend beside the host path, in one run on one card.

* Kernels: the device encode (quantise, scan, gather) and decode (count, scan, dequantise) at
  T = 512, d = 4096 (fp16 and bf16), GPU time from CUDA events after an L2 flush, as a fraction of
  the measured device-to-device copy bandwidth ("of copy"; bytes moved: encode reads x and
  writes the symbols and escaped values, decode the reverse).
* End to end, wall clock with the host copies: ``encode_v2`` of a CUDA tensor (device pass and
  the one compact device-to-host copy; no entropy stage) and ``decode_v2(..., device="cuda")``
  (one host-to-device copy and the device pass), per token (T = 1, the decode-time cost) and
  per T = 512 frame, and whole wire frames of both (``encode_frame`` with the host rANS, and
  ``decode_frame``; a one-token frame is the runtime's per-step path).
* Where a one-token step's wall time goes: ``torch.profiler`` over a few ``encode_v2`` and
  ``decode_v2`` calls of one token per GPU backend (host ops and kernels), the top rows written to
  ``codec_v2_step_profile.txt``.
* Baseline, same run: the host path (``use_backend("reference")`` has no device kernel: the
  tensor is copied to the host and the fused C++ pass runs there, as before the device pass).

Symbols come from a config calibrated at about 4 bits per element on Gaussian activations with
a few heavy channels, so escape rates are realistic. Wall-clock times are medians after warm-up.
Writes ``bench_codec_v2_gpu.json`` and ``bench_codec_v2_gpu.md`` to ``--out``.

Usage: python bench/bench_codec_v2_gpu.py --out DIR [--quick]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import splitkernels
from splitkernels.codec import calibrate, decode_frame, encode_frame
from splitkernels.codec import v2_device
from splitkernels.codec.v2 import decode_v2, encode_v2

from gpu_timing import Timer, copy_bandwidth

D = 4096
FRAME_T = 512


def activations(t: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g)
    x[:, 7] *= 12  # heavy channels, as in real hidden states
    x[:, d // 3] *= 30
    return x


def backends_on_gpu() -> list[str]:
    info = splitkernels.backends()
    return [n for n in ("cuda", "triton") if info[n]["available"] and v2_device.ENCODE_OP in info[n]["ops"]]


def forced(impl: str):
    """The device pass of backend ``impl``, or the host path for "host"."""
    return splitkernels.use_backend("reference" if impl == "host" else impl)


def wall(fn, reps: int) -> float:
    """Median wall seconds of ``fn`` (which synchronises itself), after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_kernels(timer: Timer, copy_bw: float, cfg, impl: str, dtype: torch.dtype) -> list[dict]:
    x = activations(FRAME_T, D, seed=1).to(dtype).cuda()
    lay = v2_device.layout(FRAME_T, D, x.element_size())
    packed = torch.empty(lay.capacity, dtype=torch.uint8, device="cuda")
    arrays = v2_device.config_arrays(cfg, x.device)
    with forced(impl):
        enc_kernel = v2_device.kernel(v2_device.ENCODE_OP, x.device)
        dec_kernel = v2_device.kernel(v2_device.DECODE_OP, x.device)
    enc = encode_v2(x, cfg)
    out = torch.empty_like(x)
    n_esc, n_raw = enc.escapes.numel(), int(enc.raw.sum())
    dec_packed = torch.empty(lay.used_bytes(n_esc, n_raw), dtype=torch.uint8, device="cuda")
    dec_packed[v2_device.HEADER_BYTES:v2_device.HEADER_BYTES + FRAME_T] = enc.raw.to(torch.uint8).cuda()
    dec_packed[lay.sym_off:lay.sym_off + FRAME_T * D] = enc.symbols.reshape(-1).cuda()
    values = dec_packed[lay.val_off:].view(dtype)
    values[:n_esc] = enc.escapes.cuda()
    values[n_esc:] = enc.raw_values.reshape(-1).cuda()
    te = timer(lambda: enc_kernel(x, arrays["center"], arrays["inv_step"], cfg.kmax, cfg.raw_limit, packed,
                                  lay.sym_off, lay.val_off))
    td = timer(lambda: dec_kernel(dec_packed, lay.sym_off, lay.val_off, n_esc, arrays["step"], arrays["center"],
                                  cfg.kmax, out))
    item = x.element_size()
    moved = FRAME_T * D * (item + 1) + (n_esc + n_raw * D) * item  # dense in + symbols out + values
    shape = f"T={FRAME_T} d={D} {str(dtype).replace('torch.', '')}"
    return [
        {"bench": "kernels encode", "shape": shape, "impl": impl, "us": te * 1e6, "of_copy": moved / te / copy_bw},
        {"bench": "kernels decode", "shape": shape, "impl": impl, "us": td * 1e6, "of_copy": moved / td / copy_bw},
        {"bench": "escape rate", "shape": shape, "impl": impl, "us": None,
         "of_copy": None, "note": f"{n_esc / (FRAME_T * D):.2e} escapes/value, {n_raw} raw tokens"},
    ]


def bench_end_to_end(cfg, impl: str, t: int, dtype: torch.dtype, reps: int, copy_bw: float) -> list[dict]:
    x = activations(t, D, seed=2 + t).to(dtype).cuda()
    shape = f"T={t} d={D} {str(dtype).replace('torch.', '')}"
    with forced(impl):
        enc = encode_v2(x, cfg)
        te = wall(lambda: encode_v2(x, cfg), reps)

        def dec():
            decode_v2(enc, device="cuda")
            torch.cuda.synchronize()

        td = wall(dec, reps)
        rows = [
            {"bench": "encode_v2 (device pass + copy)", "shape": shape, "impl": impl, "us": te * 1e6},
            {"bench": "decode_v2 to cuda (copy + pass)", "shape": shape, "impl": impl, "us": td * 1e6},
        ]
        # The wire frame as the runtime writes and reads it (a one-token frame: the C++ token
        # coder on the host after one copy of the token, whatever the backend).
        frame = encode_frame(x, cfg)
        tf = wall(lambda: encode_frame(x, cfg), max(3, reps // 4))

        def dec_frame():
            decode_frame(frame, config=cfg, device="cuda")
            torch.cuda.synchronize()

        tdf = wall(dec_frame, max(3, reps // 4))
        nbytes = x.numel() * x.element_size()
        rows += [
            {"bench": "frame encode (+ host rANS)", "shape": shape, "impl": impl, "us": tf * 1e6,
             "of_copy": nbytes / tf / copy_bw, "note": f"{8 * len(frame) / x.numel():.2f} bits/value"},
            {"bench": "frame decode (host rANS +)", "shape": shape, "impl": impl, "us": tdf * 1e6,
             "of_copy": nbytes / tdf / copy_bw},
        ]
    return rows


def step_profile(cfg, impl: str, device: str, calls: int = 20, rows: int = 25) -> str:
    """The profiler's table (host ops and, on a GPU, kernels) of ``calls`` one-token ``encode_v2``
    and ``decode_v2`` calls with backend ``impl`` on ``device``, after warm-up."""
    from torch.profiler import ProfilerActivity, profile

    x = activations(1, D, seed=3).to(torch.float16).to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with forced(impl):
        enc = encode_v2(x, cfg)
        for _ in range(3):
            decode_v2(encode_v2(x, cfg), device=device)
        with profile(activities=activities) as prof:
            for _ in range(calls):
                encode_v2(x, cfg)
                decode_v2(enc, device=device)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return f"## {impl}: {calls} x (encode_v2 + decode_v2) of one token, d = {D}, fp16, on {device}\n\n{table}\n"


def environment(copy_bw: float) -> dict:
    return {
        "device": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "backends": backends_on_gpu(), "copy_GBps": copy_bw / 1e9,
        "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [
        f"## Codec v2 device pass on {env['device']} ({env['time']})", "",
        f"Device-to-device copy: {env['copy_GBps']:.0f} GB/s (read + write). Kernels: GPU time (CUDA events, L2"
        " flushed); encode_v2/decode_v2/frame rows: wall clock with host copies (frame rows add the host rANS);"
        " \"of copy\" = bytes moved (kernels) or input bytes (frames) per second over the copy bandwidth.", "",
        "| bench | shape | impl | us | of copy | note |", "|---|---|---|---:|---:|---|",
    ]
    for r in rows:
        us = "" if r.get("us") is None else f"{r['us']:.1f}"
        oc = "" if r.get("of_copy") is None else f"{100 * r['of_copy']:.1f}%"
        lines.append(f"| {r['bench']} | {r['shape']} | {r['impl']} | {us} | {oc} | {r.get('note', '')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON and markdown results")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and one dtype")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_codec_v2_gpu: needs a CUDA device", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    impls = backends_on_gpu()
    if not impls:
        print(f"bench_codec_v2_gpu: no GPU backend has the v2 device pass: {splitkernels.backends()}", file=sys.stderr)
    reps = 10 if args.quick else 40
    timer = Timer(reps=reps, warmup=3)
    copy_bw = copy_bandwidth(timer)
    env = environment(copy_bw)
    print(json.dumps(env, indent=1), flush=True)
    cfg = calibrate(activations(2048, D, seed=0), bits=4.0)
    rows: list[dict] = []
    for dtype in (torch.float16,) if args.quick else (torch.float16, torch.bfloat16):
        for impl in impls:
            rows += bench_kernels(timer, copy_bw, cfg, impl, dtype)
        for t in (1, FRAME_T):
            for impl in ["host"] + impls:
                rows += bench_end_to_end(cfg, impl, t, dtype, reps, copy_bw)
        print(markdown(env, rows), flush=True)
    (args.out / "codec_v2_step_profile.txt").write_text("".join(step_profile(cfg, impl, "cuda") for impl in impls))
    (args.out / "bench_codec_v2_gpu.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    (args.out / "bench_codec_v2_gpu.md").write_text(markdown(env, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
