"""``pack_bits`` / ``unpack_bits`` on the CPU: the backend beside the plain-PyTorch reference.

For each width and size, in the same process and in interleaved rounds: the public ops under
``--backend`` and the reference ops (``splitkernels.ops.reference``). "of copy" = (code bytes +
stream bytes) / time / the bandwidth of a large ``Tensor.copy_`` measured in the same run;
"speedup" = reference time / backend time.

Usage: python bench/ops/bitpack.py --out DIR [--backend cpp] [--bits 2,3,4,8] [--rows 512] [--cols 4096]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timing  # noqa: E402  (bench/timing.py)

import splitkernels  # noqa: E402
from splitkernels import ops  # noqa: E402
from splitkernels.ops import reference as ref  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for bitpack.json / .md")
    p.add_argument("--backend", default="cpp")
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--budget", type=float, default=0.5, help="seconds per width")
    a = p.parse_args()
    start = time.perf_counter()
    result, bw = timing.new_result(a.backend)
    lines = [f"# pack_bits / unpack_bits, {a.rows} x {a.cols} codes ({result['machine']['cpu']}, copy "
             f"{bw / 1e9:.1f} GB/s)", "", "| bits | op | backend ms | reference ms | speedup | of copy |",
             "|---|---|---|---|---|---|"]
    n = a.cols
    for bits in (int(v) for v in a.bits.split(",")):
        timing.progress(f"[{time.perf_counter() - start:5.0f} s] {bits} bits")
        g = torch.Generator().manual_seed(bits)
        codes = torch.randint(0, 1 << bits, (a.rows, n), dtype=torch.uint8, generator=g)
        packed = ref.pack_bits(codes, bits)

        def forced(fn, *args):
            with splitkernels.use_backend(a.backend):
                return fn(*args)

        times = timing.compare({
            "pack": lambda: forced(ops.pack_bits, codes, bits),
            "pack ref": lambda: ref.pack_bits(codes, bits),
            "unpack": lambda: forced(ops.unpack_bits, packed, bits, n),
            "unpack ref": lambda: ref.unpack_bits(packed, bits, n),
        }, budget_s=a.budget)
        moved = codes.numel() + packed.numel()
        for op in ("pack", "unpack"):
            ours, base = times[op]["median"], times[f"{op} ref"]["median"]
            result["rows"].append({"bits": bits, "op": op, "backend_s": ours, "reference_s": base,
                                   "of_copy": moved / ours / bw})
            lines.append(f"| {bits} | {op} | {ours * 1e3:.3f} | {base * 1e3:.3f} | {base / ours:.1f}x | "
                         f"{moved / ours / bw:.0%} |")
    timing.write(a.out, "bitpack", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
