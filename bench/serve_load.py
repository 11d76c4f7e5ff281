"""Server load: aggregate decode steps/s and per-step latency with 1/4/16/64 concurrent sessions,
continuous batching on vs off, in the same run on the same machine; optionally (mode ``cluster``,
needs ``pip install ".[cluster]"``) ``--replicas`` batching replicas on Ray Serve behind one address
(``splitkernels cluster``), each with ``--threads`` torch threads.

Each mode runs the server half in its own process (so its compute has its own interpreter and the
load generator's threads do not share its GIL). The load generator holds one gRPC channel (the
package's own transport; the ``.proto`` client for the cluster) and one thread per session.
Every session sends a prefill frame, all sessions meet at a barrier, then each sends ``--steps``
one-token frames back to back (closed loop: the next step leaves when the previous token arrives). The frames are real codec frames of
the edge half's hidden states for a text (``--codec``: v2, the runtime's default, or v1), computed once up front, so the measurement is the
server's alone (the edge's compute would otherwise share this machine's cores with the server).
All modes' servers run for the whole benchmark; ``--rounds`` rounds each run every level on every
mode in turn (the order flips every round), and each row is the round with the median steps/s.
Latency percentiles are of the steady state: each session's first ``--warmup-steps`` steps after the
synchronized start (which all wait for the batch to be formed) are reported on their own.

    PYTHONPATH=. python bench/serve_load.py --model smollm2 --out /tmp/serve_load
    PYTHONPATH=. python bench/serve_load.py --modes unbatched,batched,cluster --out /tmp/serve_load

Writes ``serve_load.json`` and ``serve_load.md`` (table) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loopback import free_ports  # noqa: E402  (bench/loopback.py)
from splitkernels.codec import CodecConfig, encode  # noqa: E402
from splitkernels.runtime import ray_serve  # noqa: E402
from splitkernels.runtime.batching import BatchConfig  # noqa: E402
from splitkernels.runtime.grpc_transport import GrpcTransport  # noqa: E402
from splitkernels.runtime.protocol import Open, SamplingParams  # noqa: E402


def load(model: str):
    """(model, name): SmolLM2-135M-Instruct or a tiny random Llama."""
    from splitkernels.models import load_smollm2, tiny_model

    if model == "smollm2":
        return load_smollm2()[0], "SmolLM2-135M-Instruct"
    return tiny_model("llama", seed=0, num_layers=6, hidden=128, vocab=256), "tiny random llama"


def serve_child(args: argparse.Namespace) -> int:
    """The server process: load, split, serve on loopback, print the address, run until stdin closes."""
    from splitkernels.runtime import Limits, split_model
    from splitkernels.runtime.batching import BatchingSessionManager
    from splitkernels.runtime.grpc_transport import GrpcServer

    torch.set_num_threads(args.threads)
    model, _ = load(args.model)
    sm = split_model(model, args.split_layer, limits=Limits(max_sessions=max(args.sessions_list), max_seq_len=4096))
    manager = sm.manager
    if args.serve == "batched":
        manager = BatchingSessionManager(sm.server, manager.limits, sm.fingerprint,
                                         BatchConfig(window_s=args.window_ms / 1000, max_batch=args.max_batch))
    server = GrpcServer(manager, "127.0.0.1", 0).start()
    print(f"listening on {server.address}", flush=True)
    sys.stdin.read()  # the parent closes our stdin to stop us
    server.stop(0)
    return 0


# Codec v2 calibration text for the frames: these tokens on, disjoint from the frames' own text.
CALIB_START, CALIB_TOKENS = 8192, 1024


def make_frames(model, split_layer: int, prompt_tokens: int, steps: int,
                codec_kind: str = "v2") -> tuple[bytes, list[bytes], int, bytes]:
    """The prefill frame and ``steps`` one-token frames of the edge half's hidden states for a text,
    and the session's codec config bytes for OPEN (empty for v1). v2 is calibrated as the CLI does
    (4 bits, Fisher) on tokens after the frames' text."""
    from splitkernels.codec.spec import config_for_model
    from splitkernels.eval.text import load_text
    from splitkernels.runtime import split_model

    vocab = int(model.config.vocab_size)
    text = load_text().encode()
    ids = torch.tensor([[b % vocab for b in text[: CALIB_START + CALIB_TOKENS]]], dtype=torch.long)
    if vocab > 256:  # a real tokenizer's ids for a real model
        from splitkernels.models import load_smollm2
        ids = load_smollm2()[1](load_text(), return_tensors="pt").input_ids
    codec, open_config = CodecConfig(), b""
    if codec_kind == "v2":
        calib = ids[0, CALIB_START: CALIB_START + CALIB_TOKENS]
        codec = config_for_model({"kind": "v2", "bits": 4.0, "sensitivity": "fisher"}, model, split_layer, calib,
                                 window=min(512, calib.numel()))
        open_config = codec.canonical_bytes()
    ids = ids[:, : prompt_tokens + steps]
    sm = split_model(model, split_layer)
    cache = sm.edge.new_cache()
    prefill = encode(sm.edge.forward(ids[:, :prompt_tokens], cache, 0), codec, start=0).to_bytes()
    decodes = [encode(sm.edge.forward(ids[:, p:p + 1], cache, p), codec, start=p).to_bytes()
               for p in range(prompt_tokens, prompt_tokens + steps)]
    return prefill, decodes, sm.adapter.hidden_size, open_config


def start_cluster(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """``splitkernels cluster`` with ``--replicas`` batching replicas of the same split."""
    port, http_port = free_ports(2)
    cmd = [sys.executable, "-m", "splitkernels", "cluster", "--model", args.model, "--split-layer",
           str(args.split_layer), "--replicas", str(args.replicas), "--replica-cpus", str(args.threads),
           "--port", str(port), "--http-port", str(http_port), "--insecure", "--max-sessions",
           str(max(args.sessions_list)), "--max-seq-len", "4096", "--batch-window-ms", str(args.window_ms),
           "--max-batch", str(args.max_batch)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in proc.stdout:
        match = re.match(r"serving .* on (127\.0\.0\.1:\d+)", line)
        if match:
            return proc, match.group(1)
    raise RuntimeError(f"cluster did not start (exit status {proc.wait()})")


def start_server(args: argparse.Namespace, mode: str) -> tuple[subprocess.Popen, str]:
    if mode == "cluster":
        return start_cluster(args)
    cmd = [sys.executable, __file__, "--serve", mode, "--model", args.model, "--split-layer", str(args.split_layer),
           "--sessions", args.sessions, "--threads", str(args.threads), "--window-ms", str(args.window_ms),
           "--max-batch", str(args.max_batch)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    match = re.search(r"on (127\.0\.0\.1:\d+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"server ({mode}) did not start: {line!r}")
    return proc, match.group(1)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes ``pids`` so far (Linux /proc)."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def server_pids(client, proc: subprocess.Popen, mode: str, replicas: int) -> list[int]:
    """The processes that run the server layers: the server, or the cluster's replicas (from Info,
    which any replica may answer)."""
    if mode != "cluster":
        return [proc.pid]
    pids: set[int] = set()
    for _ in range(200):
        pids.add(client.info()["pid"])
        if len(pids) == replicas:
            return sorted(pids)
    raise RuntimeError(f"found {len(pids)} of {replicas} replicas through Info")


def batching_counters(client) -> dict | None:
    """The batching scheduler's counters from Info (None for an unbatched server)."""
    return client.info().get("batching")


def run_level(client: GrpcTransport, sessions: int, prefill: bytes, decodes: list[bytes], pids: list[int],
              codec_config: bytes = b"", warmup: int = 0) -> dict:
    """``sessions`` concurrent sessions: prefill, barrier, then ``len(decodes)`` timed steps each.

    Latency percentiles leave out each session's first ``warmup`` steps: after the synchronized
    start every session's first step waits for the batch to be formed (the padded rows built
    from the sessions' caches), which a server whose sessions come and go pays once per session;
    their median is reported beside (``first_p50_ms``). Rates count every step.

    Besides wall-clock rates, the server's own CPU seconds per decode step: on a machine shared with
    other jobs the scheduler hands out CPU per runnable thread, so a server running many threads
    (unbatched) gets a larger share than one scheduler thread; CPU per step compares the work.
    The load generator's own CPU per step (this process: the clients' gRPC calls, which share the
    machine's cores with the server) is reported beside it.
    """
    barrier = threading.Barrier(sessions + 1)
    lat: list[list[float]] = [[] for _ in range(sessions)]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with client.open(Open(SamplingParams(), max_len=0, codec_config=codec_config)) as s:
                s.step(0, prefill)
                barrier.wait(timeout=600)
                for seq, frame in enumerate(decodes, start=1):
                    t0 = time.perf_counter()
                    s.step(seq, frame)
                    lat[i].append(time.perf_counter() - t0)
        except BaseException as exc:  # reported after the run
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    barrier.wait(timeout=600)
    before = batching_counters(client)
    load0 = os.getloadavg()[0]
    start, cpu0, client0 = time.perf_counter(), cpu_seconds(pids), cpu_seconds([os.getpid()])
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - start, cpu_seconds(pids) - cpu0
    client_cpu = cpu_seconds([os.getpid()]) - client0
    load1 = os.getloadavg()[0]
    after = batching_counters(client)
    if errors:
        raise errors[0]
    flat = sorted(x for row in lat for x in row[warmup:])
    first = [x for row in lat for x in row[:warmup]]

    def pct(q: float) -> float:
        return flat[min(len(flat) - 1, int(q * len(flat)))]

    steps = sum(map(len, lat))
    row = {"sessions": sessions, "steps": steps, "wall_s": wall, "steps_per_s": steps / wall, "warmup_steps": warmup,
           "first_p50_ms": 1000 * statistics.median(first) if first else None,
           "p50_ms": 1000 * statistics.median(flat), "p99_ms": 1000 * pct(0.99), "max_ms": 1000 * flat[-1],
           "server_cpu_s": cpu, "server_cpu_ms_per_step": 1000 * cpu / steps,
           "client_cpu_ms_per_step": 1000 * client_cpu / steps, "loadavg_1m": [load0, load1]}
    if before is not None and after is not None:  # one replica's scheduler (mode cluster: whichever answered)
        batches = after["batches"] - before["batches"]
        steps = after["decode_steps"] - before["decode_steps"]
        row["mean_batch"] = steps / batches if batches else 0.0
        row["scheduler_busy"] = (after.get("busy_s_total", 0.0) - before.get("busy_s_total", 0.0)) / wall
    return row


def median_round(rows: list[dict]) -> dict:
    """The round with the median aggregate steps/s (the lower middle one of an even count), with
    every round's steps/s beside it."""
    ranked = sorted(rows, key=lambda r: r["steps_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "rounds_steps_per_s": [r["steps_per_s"] for r in rows]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output folder for serve_load.json and serve_load.md (required)")
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--split-layer", type=int, default=None, help="edge keeps layers 1..N (default: a third)")
    ap.add_argument("--sessions", default="1,4,16,64", help="comma-separated concurrency levels")
    ap.add_argument("--steps", type=int, default=24, help="timed decode steps per session")
    ap.add_argument("--warmup-steps", type=int, default=1,
                    help="each session's first decode steps left out of p50/p99 (reported as 'first step p50')")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--modes", default="unbatched,batched")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of every level on every mode; the median round is reported")
    ap.add_argument("--window-ms", type=float, default=BatchConfig().window_s * 1000, help="batching window")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--codec", choices=("v2", "v1"), default="v2",
                    help="codec of the frames: v2 (the runtime's default, calibrated here; its config travels "
                         "in OPEN) or v1")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the server (both modes; on a shared machine 2+ OpenMP threads stall)")
    ap.add_argument("--replicas", type=int, default=2, help="replicas of mode cluster")
    ap.add_argument("--serve", choices=("batched", "unbatched"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not 0 <= args.warmup_steps < args.steps:
        ap.error(f"--warmup-steps must be in [0, --steps), got {args.warmup_steps}")
    try:
        args.sessions_list = [int(x) for x in args.sessions.split(",")]
        if not args.sessions_list or min(args.sessions_list) < 1:
            raise ValueError
    except ValueError:
        ap.error(f"--sessions must be comma-separated ints >= 1, got {args.sessions!r}")
    if args.split_layer is None:
        args.split_layer = 10 if args.model == "smollm2" else 2
    if args.serve:
        return serve_child(args)
    if not args.out:
        ap.error("--out DIR is required")
    modes = args.modes.split(",")
    if not set(modes) <= {"batched", "unbatched", "cluster"}:
        ap.error(f"--modes must be among batched, unbatched and cluster, got {args.modes!r}")

    model, name = load(args.model)
    prefill, decodes, hidden, codec_config = make_frames(model, args.split_layer, args.prompt_tokens, args.steps,
                                                         args.codec)
    del model
    # Every mode's server runs for the whole benchmark; each round runs every level on every mode,
    # taking turns (the order flips each round), so load from other jobs hits all modes alike.
    servers: dict[str, tuple[subprocess.Popen, object, list[int]]] = {}
    rounds: dict[str, dict[int, list[dict]]] = {mode: {n: [] for n in args.sessions_list} for mode in modes}
    results: dict[str, list[dict]] = {}
    try:
        for mode in modes:
            proc, address = start_server(args, mode)
            connect = ray_serve.transport if mode == "cluster" else GrpcTransport
            client = connect(address, timeout_s=900)
            servers[mode] = proc, client, []
            servers[mode][2].extend(server_pids(client, proc, mode, args.replicas))
            for _ in range(2 * args.replicas if mode == "cluster" else 1):  # warm-up (each replica)
                run_level(client, 1, prefill, decodes[:4], servers[mode][2], codec_config)
        for r in range(args.rounds):
            for n in args.sessions_list:
                for mode in (modes if r % 2 == 0 else modes[::-1]):
                    _, client, pids = servers[mode]
                    row = run_level(client, n, prefill, decodes, pids, codec_config, args.warmup_steps)
                    rounds[mode][n].append(row)
                    print(f"round {r + 1} {mode:9s} {n:3d} sessions: {row['steps_per_s']:7.1f} steps/s  "
                          f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
                          f"server CPU {row['server_cpu_ms_per_step']:6.1f} ms/step", flush=True)
        for mode in modes:
            results[mode] = [median_round(rounds[mode][n]) for n in args.sessions_list]
            info = servers[mode][1].info()
            results[mode + "_server"] = {k: info.get(k) for k in ("weight_bytes", "batching")}
    finally:
        for mode, (proc, client, _) in servers.items():
            client.close()
            if mode == "cluster":
                proc.send_signal(signal.SIGTERM)
            else:
                proc.stdin.close()
            proc.wait(timeout=120)
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "server_torch_threads": args.threads, "python": platform.python_version(),
                    "cluster_replicas": args.replicas if "cluster" in modes else None,
                    "torch": torch.__version__,
                    "note": "shared with other jobs during the run: timings are noisy"},
        "model": name, "split_layer": args.split_layer, "prompt_tokens": args.prompt_tokens, "codec": args.codec,
        "decode_steps_per_session": args.steps, "warmup_steps": args.warmup_steps, "frame_bytes": {"prefill": len(prefill),
                                                                "decode_mean": sum(map(len, decodes)) / len(decodes)},
        "rounds": args.rounds, "window_ms": args.window_ms, "max_batch": args.max_batch, "hidden_size": hidden,
        "results": results,
    }
    lines = [f"# Server load: {name}, split after layer {args.split_layer}, codec {args.codec}, {args.steps} decode "
             "steps per session",
             "", f"{report['machine']['cores']} cores ({report['machine']['note']}); "
             f"server torch threads {args.threads}"
             + (f" (per replica, {args.replicas} replicas in mode cluster)" if "cluster" in modes else "")
             + f"; window {args.window_ms} ms; median of {args.rounds} rounds (modes taking turns)", "",
             "| sessions | mode | steps/s | rounds' steps/s | p50 ms | p99 ms | p99/p50 | first step p50 ms | speed-up | server CPU ms/step "
             "| CPU gain | client CPU ms/step | mean batch | scheduler busy | load avg (1 min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["sessions"]: r["steps_per_s"] for r in results.get("unbatched", [])}
    base_cpu = {r["sessions"]: r["server_cpu_ms_per_step"] for r in results.get("unbatched", [])}
    for mode in modes:
        for r in results[mode]:
            up = r["steps_per_s"] / base[r["sessions"]] if r["sessions"] in base else float("nan")
            gain = (base_cpu[r["sessions"]] / r["server_cpu_ms_per_step"]
                    if r["sessions"] in base_cpu and r["server_cpu_ms_per_step"] > 0 else float("nan"))
            each = ", ".join(f"{x:.1f}" for x in r["rounds_steps_per_s"])
            lines.append(f"| {r['sessions']} | {mode} | {r['steps_per_s']:.1f} | {each} | {r['p50_ms']:.1f} | "
                         f"{r['p99_ms']:.1f} | {r['p99_ms'] / r['p50_ms']:.2f} | "
                         + ("-" if r.get("first_p50_ms") is None else f"{r['first_p50_ms']:.1f}") + f" | {up:.2f}x | "
                         f"{r['server_cpu_ms_per_step']:.1f} | {gain:.2f}x | {r['client_cpu_ms_per_step']:.1f} | "
                         + (f"{r['mean_batch']:.1f} | {100 * r['scheduler_busy']:.0f}% | " if "mean_batch" in r else "- | - | ")
                         + "{:.1f}-{:.1f} |".format(*r["loadavg_1m"]))
    lines += ["", f"p50/p99: every session's decode steps after its first {args.warmup_steps} (steady state); "
                  "first step p50: the median latency of those first steps after the synchronized start. "
                  "Mean batch: decode steps per batched forward; scheduler busy: share of the wall time the "
                  "scheduler thread ran forwards; load avg: the machine's 1-minute load average at the level's "
                  "start and end (2 cores, shared with other jobs), of the median round. Speed-up and CPU gain: "
                  "against the unbatched server's median round at the same level. Client CPU: the load "
                  "generator's process (every session's gRPC client), which shares the cores with the server."]
    if "cluster" in modes:
        lines += ["", "Mode cluster: server CPU counts the replicas' processes, not Ray Serve's proxy and controller."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(report, indent=2))
    (out / "serve_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
