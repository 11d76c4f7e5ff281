"""A whole model's prefill on the CPU with its linear layers replaced, beside the dense model, in one run.

What a user of the drop-in replacement sees: a Hugging Face model loaded as it ships (fp32 on
the CPU), every ``nn.Linear`` of its decoder layers swapped for a low-bit ``QuantLinear``
(``replace_linear``; the LM head stays dense), and one forward pass over a prompt of T tokens
(no KV cache reuse: a prefill). Rows, interleaved round by round in one process:

* dense fp32 (the model as loaded) and dense bf16 (``model.to(torch.bfloat16)``): PyTorch's own
  ``F.linear`` (oneDNN) in every layer;
* ours W4 / W8 with fp32 activations, at torch's default fp32 matmul precision ("highest") and
  under ``torch.set_float32_matmul_precision("medium")`` (which lets torch's fp32 matmuls and
  ours compute in bf16; the dense fp32 row is measured under it too);
* ours W4 on the bf16 model.

Each row reports the median ms per forward and tokens per second; the ``threads`` option runs
each thread count in its own process (``SPLITKERNELS_NUM_THREADS`` and ``torch.set_num_threads``).

Usage: python bench/ops/model_prefill.py --out DIR [--model smollm2] [--tokens 128,512]
       [--threads 1,all] [--group 64] [--budget 4]
"""
from __future__ import annotations

import argparse
import copy
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

from splitkernels.models import PACKAGED, load_model  # noqa: E402
from splitkernels.nn import replace_linear  # noqa: E402

def _quantised(model: torch.nn.Module, bits: int, group: int) -> torch.nn.Module:
    return replace_linear(copy.deepcopy(model), bits=bits, group_size=group, progress=False)  # the LM head stays dense


def _forward(model: torch.nn.Module, ids: torch.Tensor, precision: str):
    def run() -> None:
        torch.set_float32_matmul_precision(precision)
        try:
            with torch.inference_mode():
                model(ids, use_cache=False)
        finally:
            torch.set_float32_matmul_precision("highest")
    return run


def run_config(args: argparse.Namespace, threads: int) -> list[dict]:
    """Every prompt length in this process with `threads` threads."""
    torch.set_num_threads(threads)
    dense = load_model(args.model).model.eval()
    models = {"dense fp32": dense, "dense bf16": copy.deepcopy(dense).to(torch.bfloat16),
              "ours W4": _quantised(dense, 4, args.group), "ours W8": _quantised(dense, 8, args.group)}
    models["ours W4 bf16"] = copy.deepcopy(models["ours W4"]).to(torch.bfloat16)
    rows = []
    for t in args.tokens:
        ids = torch.randint(0, dense.config.vocab_size, (1, t), generator=torch.Generator().manual_seed(t))
        fns = {
            "dense fp32": _forward(models["dense fp32"], ids, "highest"),
            "dense bf16": _forward(models["dense bf16"], ids, "highest"),
            "ours W4 fp32": _forward(models["ours W4"], ids, "highest"),
            "ours W8 fp32": _forward(models["ours W8"], ids, "highest"),
            "dense fp32, medium": _forward(models["dense fp32"], ids, "medium"),
            "ours W4 fp32, medium": _forward(models["ours W4"], ids, "medium"),
            "ours W8 fp32, medium": _forward(models["ours W8"], ids, "medium"),
            "ours W4 bf16": _forward(models["ours W4 bf16"], ids, "highest"),
        }
        r = timing.compare(fns, budget_s=args.budget, min_reps=3, max_reps=15)
        for name, v in r.items():
            rows.append({"threads": threads, "tokens": t, "method": name, "seconds": v["median"], "min_s": v["min"],
                         "max_s": v["max"], "reps": v["reps"]})
        timing.progress(f"[{threads} thr] T={t}: " + "  ".join(f"{n}={v['median'] * 1e3:.0f}" for n, v in r.items()))
    return rows


def render(result: dict) -> str:
    mc = result["machine"]
    out = [f"# {result['model']} prefill on the CPU: linear layers replaced vs the dense model", "",
           f"Command: `{result['command']}`", "",
           f"Machine: {mc['cpu']} ({', '.join(mc['cpu_flags'])}), {mc['logical_cpus']} logical CPUs, torch "
           f"{mc['torch']}, kernel ISA {mc.get('kernel_isa')}; group {result['group']}; wall clock, medians of "
           f"interleaved rounds; {result['note']}", "",
           "ms per forward pass (tokens/s). \"medium\": under `torch.set_float32_matmul_precision(\"medium\")`. "
           "**ratio** = ours / the dense model at the same dtype and precision (dense bf16 runs every op in "
           "bf16, attention and norms too, so it is a row of its own, not the peer of fp32 ones)."]
    keyed: dict[tuple, dict[str, dict]] = {}
    for r in result["rows"]:
        keyed.setdefault((r["threads"], r["tokens"]), {})[r["method"]] = r
    peers = {"ours W4 fp32": ("dense fp32",), "ours W8 fp32": ("dense fp32",),
             "ours W4 fp32, medium": ("dense fp32, medium",), "ours W8 fp32, medium": ("dense fp32, medium",),
             "ours W4 bf16": ("dense bf16",)}
    for (threads, t), rs in keyed.items():
        out += ["", f"## {threads} thread(s), T = {t} tokens", "", "| method | ms | tokens/s | ratio |", "|---|---|---|---|"]
        for name, r in rs.items():
            ratio = ""
            if name in peers:
                best = min(rs[p]["seconds"] for p in peers[name])
                v = r["seconds"] / best
                ratio = f"**{v:.2f}**" if v > 1 else f"{v:.2f}"
            out.append(f"| {name} | {r['seconds'] * 1e3:.1f} | {t / r['seconds']:.0f} | {ratio} |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="smollm2", choices=sorted(PACKAGED))
    p.add_argument("--tokens", default="128,512")
    p.add_argument("--threads", default="1,all", help="comma list of thread counts, 'all' = every CPU")
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--budget", type=float, default=4.0, help="seconds of timed forwards per prompt length")
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    a.tokens = [int(t) for t in a.tokens.split(",")]
    if a.worker:
        a.worker_out.write_text(json.dumps(run_config(a, a.worker)))
        return
    start = time.perf_counter()
    result = {"command": "python " + " ".join(sys.argv), "machine": timing.machine(), "model": a.model,
              "group": a.group, "rows": []}
    for threads in [os.cpu_count() or 1 if t == "all" else int(t) for t in a.threads.split(",")]:
        timing.progress(f"== {threads} thread(s)")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            argv = [sys.executable, __file__, "--worker", str(threads), "--worker-out", str(out), "--model", a.model,
                    "--tokens", ",".join(map(str, a.tokens)), "--group", str(a.group), "--budget", str(a.budget),
                    "--out", str(a.out)]
            subprocess.run(argv, check=True, env={**os.environ, "SPLITKERNELS_NUM_THREADS": str(threads)})
            result["rows"] += json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - start
    result["note"] = f"run took {result['wall_s']:.0f} s, load average at end {os.getloadavg()[0]:.1f}"
    timing.write(a.out, "model_prefill", result, render(result))


if __name__ == "__main__":
    main()
