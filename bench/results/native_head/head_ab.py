"""The server's one-token step with the model's own LM head against the native head
(``Server.native_head``), in turn in one process, on the split `splitkernels demo` builds for a
family whose layers stay eager (decode-step medians and time to first token). Usage: python head_ab.py [--model gemma3] [--rounds 3] [--tokens 20]"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "codec_v2" / "s72"))
from demo_split import demo_split  # noqa: E402  (the demo's model, split and codec)

PROMPT = "What is the capital of France? Answer in one sentence."


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gemma3")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=20)
    args = p.parse_args()
    _, loaded, sm = demo_split(["--model", args.model, "--eval-tokens", "0"])
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    native = sm.server.native_head
    print(f"{args.model}: server {'native layers' if sm.server.fast else 'eager layers'}, "
          f"native head: {native is not None} ({sm.server.head_reason or 'in use'})")
    runs = {"own head": [], "native head": []}
    outputs = {}
    for r in range(args.rounds + 1):  # round 0 warms both
        for name, head in (("own head", None), ("native head", native)):
            sm.server.native_head = head
            out = sm.run(ids, args.tokens).sequences
            summary = sm.last_metrics.summary()
            m = summary["decode_mean"]
            outputs[name] = out
            if r:
                runs[name].append((m["server_compute_s"], m["total_s"], summary["ttft_s"]))
                print(f"round {r} {name}: server {m['server_compute_s'] * 1e3:.2f} ms, "
                      f"per token {m['total_s'] * 1e3:.2f} ms, TTFT {summary['ttft_s'] * 1e3:.1f} ms", flush=True)
    for name, rows in runs.items():
        server, total, ttft = (statistics.median(row[i] for row in rows) * 1e3 for i in range(3))
        print(f"{name}: median server {server:.2f} ms, per token {total:.2f} ms, TTFT {ttft:.1f} ms")
    print("same tokens:", torch.equal(outputs["own head"], outputs["native head"]))


if __name__ == "__main__":
    main()
