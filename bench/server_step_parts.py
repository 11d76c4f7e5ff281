"""Two per-step costs of the batched server, each beside its baseline in the same process:

* **frame decode**: a one-token codec v2 frame of SmolLM2's split layer (the frames ``serve_load.py``
  sends) through ``codec.decode_frame`` (the C++ one-token path, ``codec/token_frame.py``) and
  through the general host path that ran before it (``wire_v2.decode_frame_v2``: the Python
  parser, rANS decoder and dequantiser), thread CPU per frame, frames back to back (warm caches);
  and the C++ path right after a native step of the server half, as a session's next frame meets
  the caches;
* **native batched step**: ``NativeDecoder.step_batch`` of the server half at 1 and 16 rows with
  the pool's idle workers spinning first (``set_spin_us``, ``SPLITKERNELS_SPIN_US``; 100 us by
  default) or sleeping at once (0), wall time, calls interleaved; with ``--busy N`` also while N
  other processes keep cores busy.

    PYTHONPATH=. python bench/server_step_parts.py --out /tmp/parts [--busy 1]

Writes ``server_step_parts.json`` and ``.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from serve_load import load, make_frames  # noqa: E402
from timing import BusyCores, compare, machine, write  # noqa: E402

from splitkernels.codec import CodecConfigV2, FrameLimits, decode_frame  # noqa: E402
from splitkernels.codec.wire_v2 import decode_frame_v2  # noqa: E402
from splitkernels.runtime import split_model  # noqa: E402


def frame_decode(decodes: list[bytes], config: CodecConfigV2) -> dict:
    """Thread-CPU microseconds per one-token frame, fast path and general path, interleaved."""
    limits = FrameLimits(d=config.d, max_tokens=4096)
    for f in decodes:  # the two paths agree on every frame (the tests check this bit for bit too)
        assert torch.equal(decode_frame(f, limits, "cpu", config=config), decode_frame_v2(f, config, limits))

    def run(fn):
        return lambda: [fn(f) for f in decodes]

    t = compare({"token_frame": run(lambda f: decode_frame(f, limits, "cpu", config=config)),
                 "general": run(lambda f: decode_frame_v2(f, config, limits))},
                budget_s=2.0, min_reps=9, clock=time.thread_time)
    return {k: 1e6 * v["median"] / len(decodes) for k, v in t.items()}


def frame_decode_after_step(server, decodes: list[bytes], config: CodecConfigV2) -> float:
    """Median thread-CPU microseconds of the C++ one-token decode, each frame right after one
    native step of the server half (one row; untimed), which evicts what a decode had cached."""
    limits = FrameLimits(d=config.d, max_tokens=4096)
    d = server.adapter.hidden_size
    caches, out = [], []
    for i in range(max(200, len(decodes))):
        if not caches or caches[0].length >= 56:
            caches = filled_caches(server, 1, 1)
        server.native.step_batch(torch.randn(1, d) * 0.1, caches, 1)
        t0 = time.thread_time()
        decode_frame(decodes[i % len(decodes)], limits, "cpu", config=config)
        out.append(time.thread_time() - t0)
    return 1e6 * sorted(out)[len(out) // 2]


def filled_caches(server, rows: int, positions: int) -> list:
    """``rows`` new decode caches of the server half, stepped natively to ``positions`` (at least 1)."""
    d = server.adapter.hidden_size
    caches = [server.new_decode_cache() for _ in range(rows)]
    server.native.step_batch(torch.zeros(rows, d), caches, 1)
    while caches[0].length < positions:
        server.native.step_batch(torch.randn(rows, d) * 0.1, caches, 1)
    return caches


def batched_step(server, rows: int, spins: tuple[int, int]) -> dict:
    """Wall milliseconds of one native batched step of ``rows`` sessions (caches of 32-56 positions)
    per pool spin setting, interleaved."""
    from splitkernels._backends import cpp

    d = server.adapter.hidden_size
    caches = {s: [] for s in spins}
    before = cpp._C.spin_us()

    def step(spin: int):
        def go():
            if not caches[spin] or caches[spin][0].length >= 56:
                caches[spin] = filled_caches(server, rows, 32)
            cpp._C.set_spin_us(spin)
            server.native.step_batch(torch.randn(rows, d) * 0.1, caches[spin], 1)
        return go

    try:
        t = compare({f"spin {s} us": step(s) for s in spins}, budget_s=8.0, min_reps=15, max_reps=200)
    finally:
        cpp._C.set_spin_us(before)
    return {k: {"median_ms": 1e3 * v["median"], "min_ms": 1e3 * v["min"], "reps": v["reps"]} for k, v in t.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--busy", type=int, default=0, help="also time the step with this many busy competing processes")
    ap.add_argument("--spin-us", type=int, default=100, help="the spin to compare with 0")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the server (serve_load.py --threads 1)
    model, name = load("smollm2")
    _, decodes, _, raw_config = make_frames(model, 10, 32, 24, "v2")
    config = CodecConfigV2.from_canonical_bytes(raw_config)
    server = split_model(model, 10).server
    result = {"machine": machine(), "model": name, "split_layer": 10, "frame_decode_us": frame_decode(decodes, config),
              "frame_bytes_mean": sum(map(len, decodes)) / len(decodes), "batched_step": {}}
    result["frame_decode_us"]["token_frame_after_step"] = frame_decode_after_step(server, decodes, config)
    spins = (0, args.spin_us)
    for busy in sorted({0, args.busy}):
        with BusyCores(busy):
            for rows in (1, 16):
                result["batched_step"][f"rows {rows}, busy {busy}"] = batched_step(server, rows, spins)
    fd = result["frame_decode_us"]
    lines = [f"# Server step parts: {name}, split after layer 10 ({result['machine']['cpu']}, "
             f"{result['machine']['logical_cpus']} CPUs, load average at start {result['machine']['loadavg_start'][0]:.1f})",
             "", "| one-token v2 frame decode | us of thread CPU per frame (median) |", "|---|---:|",
             f"| `decode_frame` (C++ one-token path) | {fd['token_frame']:.1f} |",
             f"| the same, each right after a native step of the server half | {fd['token_frame_after_step']:.1f} |",
             f"| general host path (`decode_frame_v2`, before) | {fd['general']:.1f} |", "",
             "| native batched step | " + " | ".join(f"spin {s} us: median (min) ms" for s in spins) + " | spin / no spin |",
             "|---|" + "---:|" * (len(spins) + 1)]
    for key, row in result["batched_step"].items():
        a, b = (row[f"spin {s} us"] for s in spins)
        lines.append(f"| {key} | {a['median_ms']:.2f} ({a['min_ms']:.2f}) | {b['median_ms']:.2f} ({b['min_ms']:.2f}) | "
                     f"{b['median_ms'] / a['median_ms']:.3f} |")
    lines += ["", "Calls interleaved in one process; busy N: N other processes spinning on the cores meanwhile."]
    write(Path(args.out), "server_step_parts", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
