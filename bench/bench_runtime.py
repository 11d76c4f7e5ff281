"""Split runtime throughput and server memory with 1, 4, 16 concurrent sessions over gRPC.

The server runs as its own process (``splitkernels serve``) so its RSS is the server's alone; this
process runs the edge halves, one thread per session, and polls the server's Info method for
memory while they generate. Prints a table and writes JSON.

    PYTHONPATH=. python bench/bench_runtime.py --model tiny --steps 50 --json bench/results/runtime_tiny.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from splitkernels.codec import CodecConfig  # noqa: E402
from splitkernels.runtime import split_model  # noqa: E402
from splitkernels.cli.models import load_model  # noqa: E402
from splitkernels.runtime.grpc_transport import GrpcTransport  # noqa: E402


def start_server(model: str, split: int, token: str, max_sessions: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "splitkernels.cli", "serve", "--model", model, "--port", "0",
                             "--token", token, "--split-layer", str(split), "--max-sessions", str(max_sessions)],
                            stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    match = re.search(r"on (127\.0\.0\.1:\d+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, match.group(1)


def run_level(sm, client: GrpcTransport, sessions: int, steps: int, prompt_tokens: int, vocab: int) -> dict:
    prompts = [torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(i))
               for i in range(sessions)]
    results: list = [None] * sessions
    errors: list[BaseException] = []
    samples: list[dict] = []
    done = threading.Event()

    def worker(i: int) -> None:
        try:
            results[i] = sm.run(prompts[i], steps, transport=client).metrics
        except BaseException as exc:  # reported after the run
            errors.append(exc)

    def sampler() -> None:
        while not done.wait(0.05):
            samples.append(client.info())

    idle = client.info()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(sessions)]
    watcher = threading.Thread(target=sampler)
    start = time.perf_counter()
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done.set()
    watcher.join()
    if errors:
        raise errors[0]
    decode_steps = [s for m in results for s in m.steps[1:]]
    return {
        "sessions": sessions,
        "steps_per_session": steps,
        "wall_s": wall,
        "steps_per_s": sessions * steps / wall,
        "steps_per_s_per_session": steps / wall,
        "mean_step_latency_s": sum(s.total_s for s in decode_steps) / len(decode_steps),
        "mean_server_compute_s": sum(s.server_compute_s for s in decode_steps) / len(decode_steps),
        "server_rss_idle_bytes": idle["rss_bytes"],
        "server_rss_peak_bytes": max([idle["rss_bytes"]] + [s["rss_bytes"] for s in samples]),
        "server_kv_peak_bytes": max([0] + [s["kv_bytes"] for s in samples]),
        "kv_bytes_per_token": idle["kv_bytes_per_token"],
        "bits_per_element_decode": sum(m.summary()["bits_per_element_decode"] for m in results) / sessions,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--sessions", default="1,4,16")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args()

    loaded = load_model(args.model)
    split = max(1, round(loaded.model.config.num_hidden_layers / 3))
    sm = split_model(loaded.model, split, codec=CodecConfig())
    levels = [int(n) for n in args.sessions.split(",")]
    token = secrets.token_hex(8)
    proc, address = start_server(args.model, split, token, max(levels))
    rows = []
    try:
        with GrpcTransport(address, token=token, timeout_s=3600) as client:
            sm.run(torch.zeros(1, 4, dtype=torch.long), 2, transport=client)  # warm-up
            for n in levels:
                rows.append(run_level(sm, client, n, args.steps, args.prompt_tokens, loaded.model.config.vocab_size))
    finally:
        proc.terminate()
        proc.wait()
    out = {
        "model": loaded.name, "split_layer": split, "codec": sm.codec.to_dict(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "load_average_at_end": os.getloadavg(), "results": rows,
    }
    print(f"{loaded.name}, split after layer {split}, gRPC on loopback, {args.steps} steps per session "
          f"after a {args.prompt_tokens}-token prefill")
    print(f"{'sessions':>8} {'steps/s':>9} {'per session':>12} {'step ms':>8} {'server ms':>10} "
          f"{'RSS idle MiB':>13} {'RSS peak MiB':>13} {'KV peak KiB':>12}")
    for r in rows:
        print(f"{r['sessions']:>8} {r['steps_per_s']:>9.1f} {r['steps_per_s_per_session']:>12.1f} "
              f"{1000 * r['mean_step_latency_s']:>8.2f} {1000 * r['mean_server_compute_s']:>10.2f} "
              f"{r['server_rss_idle_bytes'] / 2**20:>13.1f} {r['server_rss_peak_bytes'] / 2**20:>13.1f} "
              f"{r['server_kv_peak_bytes'] / 1024:>12.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
