"""Server fault probes: memory per forged frame, Info and OPEN latency under a flood of unopened
streams, and the time to resume a session after a restart. Writes faults.json and faults.md to
--out DIR and prints the tables.

    PYTHONPATH=. python bench/faults.py --out /tmp/faults

* memory: a server process (tiny 2-layer Llama with d = 576, SmolLM2's width, max_seq_len 2048)
  receives forged frames with a valid CRC over gRPC; its peak RSS growth per frame is read from
  /proc (VmHWM after clear_refs). The largest frames that server accepts are sent too; their
  growth includes the server layers' forward over 2048 tokens, not only the decoder.
* flood: Info latency (median of 20) and open + first step (median of 5) with 0 and 2x
  max-sessions streams that never send OPEN.
* resume: a server killed (SIGKILL) and restarted mid-generation: time from the kill to the
  resumed step (mostly the new process starting), and replaying H frames into a fresh session,
  pipelined (what the edge does) against one round trip per frame.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from loopback import free_ports  # noqa: E402  (bench/loopback.py)
import torch  # noqa: E402

from splitkernels.codec import encode  # noqa: E402
from splitkernels.codec.frame import HEADER, MAGIC  # noqa: E402
from splitkernels.models import tiny_model  # noqa: E402
from splitkernels.runtime import SplitError, split_model  # noqa: E402
from splitkernels.runtime.grpc_transport import SESSION_METHOD, GrpcTransport  # noqa: E402
from splitkernels.runtime.protocol import Open, SamplingParams  # noqa: E402
from splitkernels.runtime.resume import ResumingTransport, RetryPolicy  # noqa: E402
from splitkernels.runtime.transport import SessionHandle  # noqa: E402

HIDDEN, MAX_SEQ_LEN, MAX_SESSIONS = 576, 2048, 8
SERVER = """
import sys
from splitkernels.models import tiny_model
from splitkernels.runtime import Limits, split_model
from splitkernels.runtime.grpc_transport import GrpcServer
model = tiny_model("llama", seed=5, num_layers=2, hidden={hidden}, vocab=256)
sm = split_model(model, 1, limits=Limits(max_sessions={sessions}, max_seq_len={seq}))
server = GrpcServer(sm.manager, port=int(sys.argv[1]), open_timeout_s=5.0).start()
print("ready", server.address, flush=True)
server.wait()
"""


def _edge_model():
    return split_model(tiny_model("llama", seed=5, num_layers=2, hidden=HIDDEN, vocab=256), 1)


def start_server(port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    script = SERVER.format(hidden=HIDDEN, sessions=MAX_SESSIONS, seq=MAX_SEQ_LEN)
    proc = subprocess.Popen([sys.executable, "-c", script, str(port)], stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if not re.match(r"ready 127\.0\.0\.1:\d+", line):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def forged(size: int, t: int, d: int, bits: int) -> bytes:
    """A frame of ``size`` bytes with a valid CRC whose header claims ``t`` tokens of width ``d``."""
    buf = bytearray(size)
    HEADER.pack_into(buf, 0, MAGIC, 1, 0, 0, 0, t, d, 0)
    buf[HEADER.size : HEADER.size + min(t, size - HEADER.size - 4)] = bytes([bits]) * min(t, size - HEADER.size - 4)
    struct.pack_into("<I", buf, size - 4, zlib.crc32(memoryview(buf)[: size - 4]))
    return bytes(buf)


def memory_probe(client: GrpcTransport, pid: int) -> list[dict]:
    token_1bit = 7 + HIDDEN // 8
    fixed = HEADER.size + 4
    cases = []
    for mib in (1, 8, 32, 62):
        size = mib << 20
        cases.append((f"d=2^24, {mib} MiB", forged(size, 31, 1 << 24, 1)))
        cases.append((f"T={size // token_1bit}, {mib} MiB", forged(size, size // token_1bit, HIDDEN, 1)))
    cases.append(("accepted (decode + 2048-token forward): raw fp32", forged(fixed + MAX_SEQ_LEN * (7 + 4 * HIDDEN), MAX_SEQ_LEN,
                                                           HIDDEN, 32)))
    cases.append(("accepted (decode + 2048-token forward): 1-bit", forged(fixed + MAX_SEQ_LEN * token_1bit, MAX_SEQ_LEN, HIDDEN, 1)))
    rows = []
    for name, frame in cases:
        session = client.open(Open(SamplingParams()))
        before = _status(pid, "VmRSS:")
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        t0 = time.perf_counter()
        try:
            session.step(0, frame)
            outcome = "decoded"
            session.close()
        except SplitError as exc:
            outcome = exc.status.value
        seconds = time.perf_counter() - t0
        growth = _status(pid, "VmHWM:") - before
        rows.append({"frame": name, "frame_bytes": len(frame), "outcome": outcome, "server_growth_bytes": growth,
                     "growth_per_frame_byte": round(growth / len(frame), 3), "seconds": round(seconds, 4)})
    return rows


class _Silent:
    def __init__(self, address: str) -> None:
        self.release = threading.Event()
        self.channel = grpc.insecure_channel(address)

        def nothing():
            self.release.wait(120)
            return
            yield

        self.call = self.channel.stream_stream(SESSION_METHOD)(nothing())
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        try:
            for _ in self.call:
                pass
        except grpc.RpcError:
            pass

    def close(self) -> None:
        self.release.set()
        self.call.cancel()
        self.channel.close()


def flood_probe(client: GrpcTransport, address: str, sm) -> list[dict]:
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    frame = encode(sm.edge.forward(ids, None, 0), sm.codec).to_bytes()
    rows = []
    for streams in (0, 2 * MAX_SESSIONS):
        flood = [_Silent(address) for _ in range(streams)]
        try:
            time.sleep(1.0)  # let them arrive
            info = []
            for _ in range(20):
                t0 = time.perf_counter()
                client.info()
                info.append(time.perf_counter() - t0)
            opens = []
            for _ in range(5):
                t0 = time.perf_counter()
                session = client.open(Open(SamplingParams()))
                session.step(0, frame)
                opens.append(time.perf_counter() - t0)
                session.close()
            rows.append({"unopened_streams": streams, "info_median_ms": round(1e3 * statistics.median(info), 2),
                         "info_max_ms": round(1e3 * max(info), 2),
                         "open_and_step_median_ms": round(1e3 * statistics.median(opens), 2),
                         "waiting_streams_seen": client.info()["waiting_streams"]})
        finally:
            for s in flood:
                s.close()
    return rows


class _Sequential(SessionHandle):
    """A session whose replay makes one round trip per frame (the baseline to pipelining)."""

    def __init__(self, inner: SessionHandle) -> None:
        self.inner, self.session_id, self.max_seq_len = inner, inner.session_id, inner.max_seq_len

    def step(self, seq, frame):
        return self.inner.step(seq, frame)

    def close(self) -> None:
        self.inner.close()


def resume_probe(client: GrpcTransport, sm, histories: tuple[int, ...]) -> list[dict]:
    rows = []
    for h in histories:
        ids = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(h))
        cache, frames, step_ids, position = sm.edge.new_cache(), [], ids, 0
        for _ in range(h):  # the frames a generation of h steps sent (greedy tokens from the server)
            frames.append(encode(sm.edge.forward(step_ids, cache, position), sm.codec, start=position).to_bytes())
            position += step_ids.shape[1]
            step_ids = torch.tensor([[int(torch.randint(0, 256, (1,)))]])
        timing = {}
        for name, wrap in (("pipelined", lambda s: s), ("sequential", _Sequential)):
            samples = []
            for _ in range(5):
                session = wrap(client.open(Open(SamplingParams(), max_len=position)))
                t0 = time.perf_counter()
                session.replay(frames)
                samples.append(time.perf_counter() - t0)
                session.close()
            timing[name] = statistics.median(samples)
        rows.append({"history_frames": h, "replay_pipelined_ms": round(1e3 * timing["pipelined"], 1),
                     "replay_sequential_ms": round(1e3 * timing["sequential"], 1)})
    return rows


def restart_probe(port: int, server: list) -> dict:
    """SIGKILL the server between two steps of a generation; time until the resumed step returns."""
    sm = _edge_model()
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    with GrpcTransport(f"127.0.0.1:{port}", timeout_s=300) as client:
        # ~5 minutes of retries: a loaded machine starts the new server slowly.
        resuming = ResumingTransport(client, RetryPolicy(attempts=300, initial_s=0.1, max_s=1.0))
        session = resuming.open(Open(SamplingParams(), max_len=40))
        cache, step_ids, position = sm.edge.new_cache(), ids, 0
        marks = {}
        for seq in range(12):
            frame = encode(sm.edge.forward(step_ids, cache, position), sm.codec, start=position).to_bytes()
            if seq == 6:
                server[0].send_signal(signal.SIGKILL)
                server[0].wait()
                marks["killed"] = time.perf_counter()
                threading.Thread(target=lambda: (server.__setitem__(0, start_server(port)),
                                                 marks.__setitem__("ready", time.perf_counter())),
                                 daemon=True).start()
            reply = session.step(seq, frame).reply
            if seq == 6:
                marks["resumed"] = time.perf_counter()
            position += step_ids.shape[1]
            step_ids = torch.tensor([[reply.token]])
        session.close()
    return {"kill_to_resumed_step_s": round(marks["resumed"] - marks["killed"], 2),
            "kill_to_server_ready_s": round(marks["ready"] - marks["killed"], 2),
            "resumes": resuming.resumes, "frames_replayed": 6}


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for faults.json and faults.md")
    parser.add_argument("--histories", default="16,64,256", help="replayed history lengths, comma-separated")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_ports(1)[0]
    server = [start_server(port)]
    address = f"127.0.0.1:{port}"
    try:
        sm = _edge_model()
        with GrpcTransport(address, timeout_s=300) as client:
            client.info()  # warm the channel
            warm = encode(sm.edge.forward(torch.zeros(1, 2, dtype=torch.long), None, 0), sm.codec).to_bytes()
            warm_session = client.open(Open(SamplingParams()))
            warm_session.step(0, warm)  # loads the server's kernels before measuring
            warm_session.close()
            memory = memory_probe(client, server[0].pid)
            flood = flood_probe(client, address, sm)
            replay = resume_probe(client, sm, tuple(int(h) for h in args.histories.split(",")))
        restart = restart_probe(port, server)
    finally:
        server[0].kill()
        server[0].wait()
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average": os.getloadavg()},
        "server": {"hidden": HIDDEN, "max_seq_len": MAX_SEQ_LEN, "max_sessions": MAX_SESSIONS},
        "memory": memory, "flood": flood, "replay": replay, "restart": restart,
    }
    (out / "faults.json").write_text(json.dumps(result, indent=2))
    md = "\n\n".join([
        f"# Server faults ({platform.node()}, {os.cpu_count()} CPUs, load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())})",
        "## Server memory per forged frame\n\n" + table(memory),
        "## Info and OPEN under unopened streams\n\n" + table(flood),
        "## Replaying a session's frames\n\n" + table(replay),
        "## Restart mid-generation\n\n" + table([restart]),
    ])
    (out / "faults.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
