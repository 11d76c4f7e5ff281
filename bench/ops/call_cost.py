"""The cost of one ``lowbit_linear`` call at decode sizes, beside PyTorch's kernels, on one thread.

At M = 1 a small linear layer's kernel takes a microsecond or two, so what a call costs
around the kernel (argument checks, picking the kernel, allocating the output, the binding)
decides its time; SmolLM2-135M makes about 210 such calls per token. Rows, at one thread
(``torch.set_num_threads(1)`` and the C++ kernels' pool at one thread), for tiny (64 x 64) and
SmolLM2's shapes (N x K = 192 x 576, 576 x 576, 1536 x 576, 576 x 1536), M = 1 and 4, bf16 and
fp32 activations, group 64:

* ours: ``ops.lowbit_linear`` at W4 and W8, and ``QuantLinear`` W4 (the module call a model makes);
* PyTorch: ``F.linear`` with dense bf16 and fp32 weights, ``torch.ops.aten._weight_int8pack_mm``
  (int8 per channel) and ``_weight_int4pack_mm_for_cpu`` (int4, group 64), given x in the row's
  dtype; ``torch.empty`` of the output (the floor of any op that returns a new tensor).

With ``--before DIR`` (a folder holding another build's ``splitkernels`` package with its built
``_C`` extension, e.g. ``git archive main splitkernels | tar -x -C DIR`` plus a build of main's C++,
or this build's ``_C*.so`` where the C++ sources are the same) the same rows are measured in a
second process importing that package, the two processes taking turns
round by round (load on a shared machine hits both alike); with ``--decode`` each process also
decodes tokens through SmolLM2-135M's edge segment (embedding + layers 1-29, the model's eager
forward with every linear layer a 4-bit g32 QuantLinear, as ``bench/edge_decode.py``'s "ours
eager" row), median ms per token.

Each row: calls timed in batches (about 2 ms each) after a warm-up, the rows of one shape and
M interleaved, median of the batches' per-call CPU time of the calling thread (``--clock
wall``: wall time), then the median over rounds.

Usage: python bench/ops/call_cost.py --out DIR [--before DIR] [--decode] [--rounds 3]
       [--shapes 64x64,192x576,576x576,1536x576,576x1536] [--m 1,4]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1]
GROUP = 64
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
TORCH = ("F.linear bf16", "F.linear fp32", "torch int8pack", "torch int4pack")
OURS = ("ours W4", "ours W8", "QuantLinear W4")
FLOOR = "torch.empty"
DECODE_PROMPT = 32
SPLIT = 29


def _time_batches(fns: dict, clock, batch_s: float = 2e-3, batches: int = 9) -> dict[str, float]:
    """Median seconds per call of each fn: batches of calls, the fns taking turns."""
    sizes = {}
    for name, fn in fns.items():
        for _ in range(20):
            fn()
        start = time.perf_counter()
        for _ in range(20):
            fn()
        per = (time.perf_counter() - start) / 20
        sizes[name] = max(5, min(5000, int(batch_s / max(per, 1e-7))))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(batches):
        for name, fn in fns.items():
            n = sizes[name]
            start = clock()
            for _ in range(n):
                fn()
            samples[name].append((clock() - start) / n)
    return {k: statistics.median(v) for k, v in samples.items()}


class OpRows:
    """The op rows of one process: inputs built once, ``measure()`` is one round."""

    def __init__(self, shapes: list[tuple[int, int]], ms: list[int], clock) -> None:
        from splitkernels import ops
        from splitkernels.nn import QuantLinear
        from splitkernels.quant import quantize_weight

        self.clock = clock
        self.cases = []
        for n, k in shapes:
            g = torch.Generator().manual_seed(n * 7 + k)
            w = torch.randn(n, k, generator=g)
            w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g), 2)
            w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
            dense = {"F.linear bf16": w.bfloat16(), "F.linear fp32": w}
            for dname, dt in DTYPES.items():
                qws = {b: quantize_weight(w, b, GROUP, dtype=dt) for b in (4, 8)}
                layer = QuantLinear.from_quantized(qws[4])
                sz4 = torch.randn(k // GROUP, n, 2, dtype=dt, generator=g).to(dt)
                s8 = torch.rand(n, generator=g).to(dt)
                for m in ms:
                    x = torch.randn(m, k, generator=g).to(dt)
                    xd = {"F.linear bf16": x.bfloat16(), "F.linear fp32": x.float()}
                    fns = {
                        "ours W4": lambda x=x, q=qws[4]: ops.lowbit_linear(x, q),
                        "ours W8": lambda x=x, q=qws[8]: ops.lowbit_linear(x, q),
                        "QuantLinear W4": lambda x=x, layer=layer: layer(x),
                        **{name: (lambda x=xd[name], wd=wd: torch.nn.functional.linear(x, wd))
                           for name, wd in dense.items()},
                        "torch int8pack": lambda x=x, w8=w8, s8=s8: torch.ops.aten._weight_int8pack_mm(x, w8, s8),
                        "torch int4pack": lambda x=x, w4=w4, sz4=sz4: torch.ops.aten._weight_int4pack_mm_for_cpu(
                            x, w4, GROUP, sz4),
                        FLOOR: lambda m=m, n=n, dt=dt: torch.empty(m, n, dtype=dt),
                    }
                    self.cases.append(({"N": n, "K": k, "M": m, "dtype": dname}, fns))

    def measure(self) -> list[dict]:
        rows = []
        with torch.inference_mode():
            for key, fns in self.cases:
                for name, s in _time_batches(fns, self.clock).items():
                    rows.append({**key, "method": name, "seconds": s})
        return rows


class Decode:
    """SmolLM2-135M's edge segment, eager, 4-bit g32 linear layers: ``measure()`` decodes one round."""

    def __init__(self, steps: int) -> None:
        from splitkernels.models import adapter_for, load_smollm2
        from splitkernels.nn import replace_linear
        from splitkernels.runtime.segments import Edge

        model, tokenizer = load_smollm2()
        self.prompt = tokenizer("Once upon a time, in a small village by the sea, there lived an old fisherman "
                                "who told stories to every child that", return_tensors="pt").input_ids[:, :DECODE_PROMPT]
        replace_linear(model, bits=4, group_size=32, filter=lambda name, m: ".layers." in name and
                       int(name.split(".layers.")[1].split(".")[0]) < SPLIT, progress=False)
        self.edge = Edge(adapter_for(model), SPLIT, fast=False)
        self.tokens = torch.randint(0, model.config.vocab_size, (steps,),
                                    generator=torch.Generator().manual_seed(0)).tolist()
        self.linears = sum(1 for m in model.modules() if type(m).__name__ == "QuantLinear")

    def measure(self) -> dict:
        wall, cpu = [], []
        with torch.inference_mode():
            cache = self.edge.new_decode_cache()
            self.edge.forward(self.prompt, cache, 0)
            pos = self.prompt.shape[1]
            for tok in self.tokens:
                t0, c0 = time.perf_counter(), time.process_time()
                self.edge.forward(torch.tensor([[tok]]), cache, pos)
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                pos += 1
        return {"ms_per_token": 1e3 * statistics.median(wall), "cpu_ms_per_token": 1e3 * statistics.median(cpu),
                "steps": len(wall), "quant_linears": self.linears}


def worker(args: argparse.Namespace) -> None:
    """Serve rounds over stdin/stdout: each input line runs one round, one JSON line answers."""
    import splitkernels
    import splitkernels._C as _C

    torch.set_num_threads(1)
    _C.set_num_threads(1)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    ops_rows = OpRows(args.shapes, args.m, clock)
    decode = Decode(args.steps) if args.decode else None
    print(json.dumps({"ready": True, "package": str(Path(splitkernels.__file__).parent)}), flush=True)
    for _ in sys.stdin:
        out = {"rows": ops_rows.measure()}
        if decode is not None:
            out["decode"] = decode.measure()
        print(json.dumps(out), flush=True)


def start_worker(args: argparse.Namespace, package_dir: Path | None) -> tuple[subprocess.Popen, str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--clock", args.clock, "--steps", str(args.steps),
            "--shapes", ",".join(f"{n}x{k}" for n, k in args.shapes), "--m", ",".join(map(str, args.m))]
    if args.decode:
        argv.append("--decode")
    env = {**os.environ, "SPLITKERNELS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    if package_dir is not None:  # the copy's package ahead of the installed one
        env["PYTHONPATH"] = os.pathsep.join([str(package_dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    hello = json.loads(proc.stdout.readline())
    return proc, hello["package"]


def one_round(proc: subprocess.Popen) -> dict:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def summarise(rounds: list[dict]) -> dict:
    """Median over rounds of each row's seconds (and of the decode's ms per token)."""
    by: dict[tuple, list[float]] = {}
    for r in rounds:
        for row in r["rows"]:
            by.setdefault((row["N"], row["K"], row["M"], row["dtype"], row["method"]), []).append(row["seconds"])
    rows = [{"N": n, "K": k, "M": m, "dtype": d, "method": meth, "seconds": statistics.median(v), "rounds": v}
            for (n, k, m, d, meth), v in by.items()]
    out = {"rows": rows}
    if rounds and "decode" in rounds[0]:
        dec = [r["decode"] for r in rounds]
        out["decode"] = {"ms_per_token": statistics.median(d["ms_per_token"] for d in dec),
                         "cpu_ms_per_token": statistics.median(d["cpu_ms_per_token"] for d in dec),
                         "rounds_ms": [d["ms_per_token"] for d in dec], "steps": dec[0]["steps"],
                         "quant_linears": dec[0]["quant_linears"]}
    return out


def render(result: dict) -> str:
    mc = result["machine"]
    builds = list(result["builds"])
    lines = [
        "# lowbit_linear call cost (CPU, one thread)", "",
        f"Command: `{result['command']}`", "",
        f"Machine: {mc['cpu']} ({', '.join(mc['cpu_flags'])}), {mc['logical_cpus']} logical CPUs, torch {mc['torch']}, "
        f"kernel ISA {mc.get('kernel_isa')}; load average {mc['loadavg_start'][0]:.1f} at start, "
        f"{result['loadavg_end'][0]:.1f} at end (**shared machine**: compare within a row). One thread: "
        f"torch.set_num_threads(1), the kernels' pool at 1. Clock: {result['clock']}"
        + (" (CPU time of the calling thread)" if result["clock"] == "thread" else " (wall)")
        + f"; median over {result['rounds']} rounds"
        + (f", the builds taking turns ({', '.join(f'{b}: `{p}`' for b, p in result['builds'].items())})"
           if len(builds) > 1 else "") + ". Times in us per call; group 64.", "",
        "ratio = ours / F.linear bf16 of the same build's process (< 1: ours is faster).", "",
    ]
    rows = {}
    for b in builds:
        for r in result[b]["rows"]:
            rows.setdefault((r["N"], r["K"], r["dtype"], r["M"]), {})[(b, r["method"])] = r["seconds"] * 1e6
    cols = [(b, m) for b in builds for m in OURS] + [(builds[-1], m) for m in TORCH + (FLOOR,)]
    head = [f"{m} ({b})" if len(builds) > 1 and m in OURS else m for b, m in cols]
    ratio_cols = [(b, "ours W4") for b in builds]
    lines.append("| N x K | x dtype | M | " + " | ".join(head) + " | "
                 + " | ".join(f"W4 ratio ({b})" if len(builds) > 1 else "W4 ratio" for b, _ in ratio_cols) + " |")
    lines.append("|---|---|---|" + "---|" * (len(cols) + len(ratio_cols)))
    for (n, k, d, m), v in rows.items():
        cells = [f"{v[c]:.1f}" if c in v else "-" for c in cols]
        ratios = [f"{v[(b, 'ours W4')] / v[(b, 'F.linear bf16')]:.2f}" for b, _ in ratio_cols]
        lines.append(f"| {n} x {k} | {d} | {m} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    if "decode" in result[builds[-1]]:
        lines += ["", "## SmolLM2-135M edge segment, eager decode (layers 1-29, 4-bit g32 QuantLinear)", "",
                  "| build | ms / token (wall) | CPU ms / token | rounds (ms / token) | QuantLinear layers |",
                  "|---|---|---|---|---|"]
        for b in builds:
            dec = result[b]["decode"]
            lines.append(f"| {b} | {dec['ms_per_token']:.2f} | {dec['cpu_ms_per_token']:.2f} | "
                         + ", ".join(f"{t:.2f}" for t in dec["rounds_ms"]) + f" | {dec['quant_linears']} |")
        lines.append("")
        lines.append(f"{result[builds[-1]]['decode']['steps']} decode steps per round after a {DECODE_PROMPT}-token "
                     "prompt; each round's median step, then the median over rounds.")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for call_cost.json / .md (required)")
    p.add_argument("--before", type=Path, help="folder holding another build's splitkernels package (e.g. main's)")
    p.add_argument("--decode", action="store_true", help="also decode tokens through SmolLM2's edge segment")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=32, help="decode steps per round (--decode)")
    p.add_argument("--shapes", default="64x64,192x576,576x576,1536x576,576x1536", help="N x K list")
    p.add_argument("--m", default="1,4")
    p.add_argument("--clock", choices=("thread", "wall"), default="thread")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    args.m = [int(m) for m in args.m.split(",")]
    if args.worker:
        worker(args)
        return

    if args.out is None:
        p.error("--out DIR is required")
    sys.path.insert(0, str(BENCH))
    import timing  # bench/timing.py

    if args.before is not None and not (args.before / "splitkernels" / "__init__.py").exists():
        p.error(f"--before must hold a splitkernels package, got {args.before}")
    start = time.perf_counter()
    machine = timing.machine()
    builds = {"before": args.before} if args.before else {}
    builds["this build"] = None
    procs = {}
    for name, pkg in builds.items():
        timing.progress(f"starting the {name} process")
        procs[name] = start_worker(args, pkg)
    rounds: dict[str, list[dict]] = {name: [] for name in builds}
    for r in range(args.rounds):
        for name, (proc, _) in procs.items():
            timing.progress(f"round {r + 1}/{args.rounds}: {name}")
            rounds[name].append(one_round(proc))
    for proc, _ in procs.values():
        proc.stdin.close()
        proc.wait()
    result = {"command": "python " + " ".join(sys.argv), "machine": machine, "clock": args.clock,
              "rounds": args.rounds, "group": GROUP, "builds": {n: pkg for n, (_, pkg) in procs.items()}}
    for name in builds:
        result[name] = summarise(rounds[name])
    result["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - start
    timing.write(args.out, "call_cost", result, render(result))


if __name__ == "__main__":
    main()
