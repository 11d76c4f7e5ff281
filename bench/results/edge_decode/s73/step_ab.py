"""The native decode step of SmolLM2's split (edge: layers 1-10; server: layers 11-30 and the int8
head), timed in one process per source tree, the trees taking turns: an A/B of two builds of the
step. Usage: python step_ab.py OLD_TREE NEW_TREE [--rounds 3] [--steps 40]"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time, torch
from transformers import DynamicCache
from splitkernels.fastpath import NativeDecoder
from splitkernels.models import load_model
steps = int(sys.argv[1])
model = load_model("smollm2").model
d = model.config.hidden_size
out = {}
for name, first, last, head in (("edge", 0, 10, None), ("server", 10, 30, "int8")):
    dec = NativeDecoder(model, first, last, head=head)
    cache = dec.new_cache(lambda: DynamicCache(config=model.config))
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps + 5):
        h = torch.randn(d, generator=gen)
        t = time.perf_counter()
        dec.step(h, cache)
        times.append(time.perf_counter() - t)
    out[name] = statistics.median(times[5:]) * 1e3
print(json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    runs = {"old": [], "new": []}
    for r in range(args.rounds):
        for name in ("old", "new"):
            tree = getattr(args, name)
            env = {**os.environ, "PYTHONPATH": tree}
            res = subprocess.run([sys.executable, "-c", CHILD, str(args.steps)], env=env, cwd="/tmp",
                                 capture_output=True, text=True, check=True)
            row = json.loads(res.stdout.strip().splitlines()[-1])
            runs[name].append(row)
            print(f"round {r + 1} {name}: edge {row['edge']:.3f} ms, server {row['server']:.3f} ms", flush=True)
    for name, rows in runs.items():
        print(f"{name}: median edge {statistics.median(x['edge'] for x in rows):.3f} ms, "
              f"server {statistics.median(x['server'] for x in rows):.3f} ms")


if __name__ == "__main__":
    main()
