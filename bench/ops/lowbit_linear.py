"""lowbit_linear on the CPU beside PyTorch's own kernels, in one run on one machine.

For each weight shape (N x K), activation dtype and batch size M, in the same process and in
interleaved rounds: ``splitkernels.ops.lowbit_linear`` (W2/W3/W4/W8, group 128, or 64 where
128 does not divide K; ``--group G`` for another) under the chosen backend, and PyTorch's
``F.linear`` in fp32 and bf16 (dense weights), ``torch.ops.aten._weight_int4pack_mm_for_cpu``
(int4, the same group, what torchao uses on CPU; it takes groups of 32 to 256 only, so 256 for
longer ones, e.g. per channel) and ``torch.ops.aten._weight_int8pack_mm``
(int8 per channel). PyTorch's bf16 ``F.linear`` and packed kernels get the activations already
rounded to bf16 (the cast is not timed), also in the fp32 rows: they are the fastest PyTorch
offers for those inputs, and ours take the fp32 activations as they come. Each thread count
runs in its own process (``SPLITKERNELS_NUM_THREADS`` and ``torch.set_num_threads``); with
``--busy N`` a second pass repeats everything while N other processes spin, to show whether
the kernels' threads collapse when a core is taken. Default shapes: a 4096-wide layer, SmolLM2's
MLP both ways, and Qwen2-0.5B's up projection (K = 896: rows of at most 512 bytes in groups of
128, where the several-row kernels once ran twice as slow at M = 2-3).

"of copy" is (bytes the op must read: packed weight, scales, zeros, x) / time / copy bandwidth
(read + write of a large ``Tensor.copy_`` on all threads, or on one thread with ``--clock thread``,
measured in the same run): the
fraction of the memory-bandwidth limit, meaningful where the op is memory-bound (small M).

The dtype ``float32-medium`` is fp32 activations under ``torch.set_float32_matmul_precision("medium")``
for every method alike: torch's fp32 ``F.linear`` may then compute in bf16, and so do ours. The
dtype ``float16`` gives ours fp16 activations (and fp16 scales), torch's kernels the same values as
fp32 or rounded to bf16 as in the other rows.

``--isa NAME`` runs our kernels as built for that instruction set and caps PyTorch's to the same
(``torch_isa_env``), e.g. ``--isa avx2`` on an AVX-512 machine for an AVX2 machine's table.

Usage: python bench/ops/lowbit_linear.py --out DIR [--backend cpp] [--threads 1,all]
       [--m 1,4,16,64,512] [--shapes 4096x4096,1536x576,576x1536,4864x896] [--bits 2,3,4,8]
       [--dtypes float32,float32-medium,bfloat16,float16] [--group 32] [--busy 1] [--quick] [--isa avx2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timing  # noqa: E402  (bench/timing.py)

import splitkernels  # noqa: E402
from splitkernels import ops  # noqa: E402
from splitkernels._backends import cpp  # noqa: E402
from splitkernels.quant import quantize_weight  # noqa: E402

# Activation dtype and torch's fp32 matmul precision while it is timed.
DTYPES = {"float32": (torch.float32, "highest"), "float32-medium": (torch.float32, "medium"),
          "bfloat16": (torch.bfloat16, "highest"), "float16": (torch.float16, "highest")}
TORCH = ("F.linear fp32", "F.linear bf16", "torch int4pack", "torch int8pack")
INT4PACK_MAX_GROUP = 256  # _weight_int4pack_mm_for_cpu's longest group


# PyTorch's kernels capped to the instruction set that --isa gives ours (ATen's own kernels such as
# int4pack, oneDNN's and MKL's), so that a table run with --isa avx2 on an AVX-512 machine stands for
# an AVX2 machine on both sides. Sets beyond AVX-512 BF16 (AMX) leave torch as it is.
_TORCH_ISA_ENV = {
    "generic": ("default", "SSE41", "SSE4_2"),
    "avx2": ("avx2", "AVX2", "AVX2"),
    "avx512": ("avx512", "AVX512_CORE", "AVX512"),
    "avx512_vnni": ("avx512", "AVX512_CORE_VNNI", "AVX512"),
    "avx512_bf16": ("avx512", "AVX512_CORE_BF16", "AVX512"),
    "avx512_bf16_vbmi": ("avx512", "AVX512_CORE_BF16", "AVX512"),
}


def torch_isa_env(isa: str | None) -> dict[str, str]:
    """Environment that caps PyTorch's CPU kernels to `isa` (ours); empty where none is given or known."""
    if isa not in _TORCH_ISA_ENV:
        return {}
    aten, onednn, mkl = _TORCH_ISA_ENV[isa]
    return {"ATEN_CPU_CAPABILITY": aten, "ONEDNN_MAX_CPU_ISA": onednn, "MKL_ENABLE_INSTRUCTIONS": mkl}


def group_for(k: int, group: int = 0) -> int:
    """`group` where given (main checks that it divides K), else 128, or 64 where 128 does not divide K."""
    return group or (128 if k % 128 == 0 else 64)


def run_config(args: argparse.Namespace, threads: int) -> list[dict]:
    """Every (shape, dtype, M) in this process with `threads` threads."""
    torch.set_num_threads(threads)
    if args.isa:
        cpp._C.set_lowbit_isa(args.isa)
    rows = []
    for shape in args.shapes:
        n, k = shape
        g = torch.Generator().manual_seed(n + k)
        w = torch.randn(n, k, generator=g)
        group = group_for(k, args.group)
        qws = {b: quantize_weight(w, b, group) for b in args.bits}
        w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 2)
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        for dname in args.dtypes:
            dt, precision = DTYPES[dname]
            dense = {"F.linear fp32": w, "F.linear bf16": w.bfloat16()}
            q_dt = {b: quantize_weight(w, b, group, dtype=dt) if dt != torch.float32 else q for b, q in qws.items()}
            # torch's packed kernels take bf16 activations here, as torchao feeds them on the CPU: with
            # fp32 activations they run 30-60x slower, and each call left the next one cold.
            pack_dt = torch.bfloat16
            pack_group = min(group, INT4PACK_MAX_GROUP)
            sz4 = torch.randn(k // pack_group, n, 2, dtype=pack_dt)
            s8 = torch.rand(n, dtype=pack_dt)
            for m in args.m:
                x = torch.randn(m, k, generator=g).to(dt)
                xs = {"F.linear fp32": x.float(), "F.linear bf16": x.bfloat16()}
                fns = {name: (lambda name=name: torch.nn.functional.linear(xs[name], dense[name])) for name in dense}
                xp = x.to(pack_dt)
                fns["torch int4pack"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xp, w4, pack_group, sz4)
                fns["torch int8pack"] = lambda: torch.ops.aten._weight_int8pack_mm(xp, w8, s8)
                with splitkernels.use_backend(args.backend):
                    for b, q in q_dt.items():
                        fns[f"W{b}"] = lambda q=q: ops.lowbit_linear(x, q)
                    clock = time.thread_time if args.clock == "thread" else time.perf_counter
                    torch.set_float32_matmul_precision(precision)
                    try:
                        r = timing.compare(fns, budget_s=args.budget, clock=clock)
                    finally:
                        torch.set_float32_matmul_precision("highest")
                xbytes = m * k * x.element_size()
                moved = {"F.linear fp32": n * k * 4 + m * k * 4, "F.linear bf16": n * k * 2 + m * k * 2,
                         "torch int4pack": n * k // 2 + sz4.numel() * sz4.element_size() + xbytes,
                         "torch int8pack": n * k + n * s8.element_size() + xbytes,
                         **{f"W{b}": q.nbytes + xbytes for b, q in q_dt.items()}}
                for name, t in r.items():
                    rows.append({"threads": threads, "N": n, "K": k, "group": group, "dtype": dname, "M": m,
                                 "method": name, "seconds": t["median"], "min_s": t["min"], "max_s": t["max"],
                                 "reps": t["reps"], "bytes": moved[name]})
                best = min(TORCH, key=lambda nm: r[nm]["median"])
                timing.progress(f"[{threads} thr] {n}x{k} {dname} M={m}: " + "  ".join(
                    f"{nm}={t['median']*1e3:.2f}" for nm, t in r.items()) + f"  (best torch: {best})")
    return rows


def render(result: dict) -> str:
    mc, bw = result["machine"], result["copy_bandwidth_gbps"]
    out = [
        "# lowbit_linear (CPU) beside PyTorch's own kernels",
        "",
        f"Command: `{result.get('command', '')}`",
        "",
        f"Machine: {mc['cpu']} ({', '.join(mc['cpu_flags'])}), {mc['logical_cpus']} logical CPUs, torch {mc['torch']}, "
        f"kernel ISA {mc.get('kernel_isa')}"
        + (f", PyTorch's capped: {mc['torch_isa']}" if "torch_isa" in mc else "")
        + f"; backend `{result['backend']}`; OMP_WAIT_POLICY "
        f"{mc.get('omp_wait_policy', 'default')}; load average at start "
        f"{mc['loadavg_start'][0]:.1f}. Copy bandwidth (read + write, "
        + ("one thread, thread clock" if result["clock"] == "thread" else "all threads") + f"): {bw:.1f} GB/s. "
        f"Medians of interleaved rounds after warm-up, clock: {result['clock']}"
        + (" (CPU time of the calling thread)" if result["clock"] == "thread" else " (wall)") + f"; {result['note']}",
        "",
        "Times in ms. **Wb/best** = our b-bit time / PyTorch's fastest of the four kernels at that row "
        "(< 1 means ours is faster; **bold** where ours is slower). W2/W3 move fewer bytes than W4 and W8 "
        "more (int4pack reads half of W8's bytes: W8/int8pack compares like with like). PyTorch's bf16 "
        "`F.linear` and packed kernels get the activations rounded to bf16 (the cast not timed), in the fp32 "
        "rows too; ours take them as they come (fp32: exact unless the precision is \"medium\").",
    ]
    methods = [m for m in result["methods"]]
    keyed: dict[tuple, dict[str, dict]] = {}
    for r in result["rows"]:
        key = (r["busy"], r["threads"], r["N"], r["K"], r["group"], r["dtype"])
        keyed.setdefault(key, {}).setdefault(r["M"], {})[r["method"]] = r
    for (busy, threads, n, k, group, dname), by_m in keyed.items():
        out += ["", f"## {n} x {k}, group {group}, {dname} activations, {threads} thread(s)"
                + (f", {busy} competing busy process(es)" if busy else ""), ""]
        ours = [x for x in methods if x not in TORCH]
        out.append("| M | " + " | ".join(methods) + " | " + " | ".join(f"{x}/best" for x in ours)
                   + " | W8/int8pack | W4 of copy |")
        out.append("|---|" + "---|" * (len(methods) + len(ours) + 2))
        for m, rs in by_m.items():
            cells = [f"{rs[x]['seconds']*1e3:.3f}" if x in rs else "-" for x in methods]
            best_torch = min(rs[x]["seconds"] for x in TORCH)
            ratios = [rs[x]["seconds"] / best_torch for x in ours if x in rs]
            w8 = f"{rs['W8']['seconds'] / rs['torch int8pack']['seconds']:.2f}" if "W8" in rs else "-"
            w4 = rs.get("W4")
            frac = f"{w4['bytes'] / w4['seconds'] / (bw * 1e9):.0%}" if w4 else "-"
            out.append(f"| {m} | " + " | ".join(cells) + " | "
                       + " | ".join(f"**{r:.2f}**" if r > 1 else f"{r:.2f}" for r in ratios) + f" | {w8} | {frac} |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "out" / "ops")
    p.add_argument("--backend", default="cpp")
    p.add_argument("--threads", default="1,all", help="comma list of thread counts, 'all' = every CPU")
    p.add_argument("--m", default="1,4,16,64,512")
    p.add_argument("--shapes", default="4096x4096,1536x576,576x1536,4864x896", help="N x K list")
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--dtypes", default="float32,bfloat16", help=f"comma list of {', '.join(DTYPES)}")
    p.add_argument("--group", type=int, default=0, help="group size of every low-bit weight (default 128, or 64)")
    p.add_argument("--busy", type=int, default=0, help="also run with this many spinning processes")
    p.add_argument("--budget", type=float, default=0.8, help="seconds of timed calls per row")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="thread: CPU time of the calling thread, robust to other processes on a shared "
                        "machine; only with --threads 1 (every kernel then runs on the calling thread)")
    p.add_argument("--quick", action="store_true", help="4096x4096, W4/W8, M = 1 and 16, bf16 only")
    p.add_argument("--isa", choices=cpp._C.lowbit_isas(),
                   help="run our kernels as built for this instruction set (e.g. avx2 on an AVX-512 "
                   "machine), PyTorch's capped to the same (ATEN_CPU_CAPABILITY, "
                   "ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS)")
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.shapes, a.bits, a.m, a.dtypes = "4096x4096", "4,8", "1,16", "bfloat16"
    a.shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    a.bits = [int(b) for b in a.bits.split(",")]
    a.m = [int(m) for m in a.m.split(",")]
    a.dtypes = a.dtypes.split(",")
    if not set(a.dtypes) <= set(DTYPES):
        p.error(f"--dtypes must be a comma list of {', '.join(DTYPES)}, got {','.join(a.dtypes)}")
    if a.group and any(k % a.group for _, k in a.shapes):
        p.error(f"--group {a.group} must divide every K of --shapes")
    if a.clock == "thread" and a.threads != "1" and not a.worker:
        p.error("--clock thread needs --threads 1: other threads' CPU time would not be counted")
    if a.worker:
        a.worker_out.write_text(json.dumps(run_config(a, a.worker)))
        return

    start = time.perf_counter()
    if a.clock == "thread":  # the yardstick on the same clock: one thread's copy bandwidth
        torch.set_num_threads(1)
    copy_clock = time.thread_time if a.clock == "thread" else time.perf_counter
    machine = timing.machine()
    if a.isa:
        machine["kernel_isa"] = f"{a.isa} (chosen; the CPU's own: {machine.get('kernel_isa')})"
        machine["torch_isa"] = " ".join(f"{k}={v}" for k, v in torch_isa_env(a.isa).items()) or "the CPU's own"
    result = {"command": "python " + " ".join(sys.argv), "machine": machine, "backend": a.backend, "clock": a.clock, "copy_bandwidth_gbps": timing.copy_bandwidth(copy_clock) / 1e9,
              "methods": list(TORCH) + [f"W{b}" for b in a.bits], "rows": []}
    counts = [os.cpu_count() or 1 if t == "all" else int(t) for t in a.threads.split(",")]
    for busy in [0] + ([a.busy] if a.busy else []):
        for threads in counts:
            timing.progress(f"== {threads} thread(s), {busy} busy process(es)")
            with tempfile.TemporaryDirectory() as tmp, timing.BusyCores(busy):
                out = Path(tmp) / "rows.json"
                argv = [sys.executable, __file__, "--worker", str(threads), "--worker-out", str(out),
                        "--backend", a.backend, "--m", ",".join(map(str, a.m)),
                        "--shapes", ",".join(f"{n}x{k}" for n, k in a.shapes), "--bits", ",".join(map(str, a.bits)),
                        "--dtypes", ",".join(a.dtypes), "--budget", str(a.budget), "--clock", a.clock,
                        "--group", str(a.group)]
                argv += ["--isa", a.isa] if a.isa else []
                env = {**os.environ, "SPLITKERNELS_NUM_THREADS": str(threads), **torch_isa_env(a.isa)}
                subprocess.run(argv, check=True, env=env)
                result["rows"] += [{**r, "busy": busy} for r in json.loads(out.read_text())]
    result["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - start
    result["note"] = (f"run took {result['wall_s']:.0f} s, load average at end {result['loadavg_end'][0]:.1f} "
                      "(on a shared machine absolute times are noisy; compare within a row).")
    timing.write(a.out, "lowbit_linear", result, render(result))


if __name__ == "__main__":
    main()
