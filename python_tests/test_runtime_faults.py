"""Server faults over gRPC on loopback: idle and unopened streams, forged frame headers, a server
killed (SIGKILL) and restarted mid-generation, and the SIGTERM drain."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from runtime_helpers import free_ports, prompt as _prompt
from splitkernels.cli.models import load_model
from splitkernels.codec import encode
from splitkernels.codec.frame import HEADER, MAGIC
from splitkernels.models import tiny_model
from splitkernels.runtime import Limits, SplitError, Status, split_model
from splitkernels.runtime.grpc_transport import SESSION_METHOD, GrpcServer, GrpcTransport
from splitkernels.runtime.protocol import Open, SamplingParams
from splitkernels.runtime.resume import ResumingTransport, RetryPolicy
from splitkernels.runtime.transport import Exchange, SessionHandle, Transport

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=31, num_layers=2, hidden=32)


def test_idle_expiry_reaches_the_client_as_a_clear_status(model):
    sm = split_model(model, 1, limits=Limits(idle_timeout_s=0.3))
    with GrpcServer(sm.manager) as server, GrpcTransport(server.address) as client:
        session = client.open(Open(SamplingParams()))
        deadline = time.monotonic() + 20
        while sm.manager.num_sessions and time.monotonic() < deadline:
            time.sleep(0.02)
        frame = encode(sm.edge.forward(_prompt(1, 3), None, 0), sm.codec).to_bytes()
        with pytest.raises(SplitError) as e:
            session.step(0, frame)
        assert e.value.status is Status.CANCELLED
        assert "idle timeout" in e.value.message and "0.3 s" in e.value.message, e.value.message


def test_forged_headers_are_refused_before_decoding(model):
    sm = split_model(model, 1, limits=Limits(max_seq_len=16))
    with GrpcServer(sm.manager) as server, GrpcTransport(server.address) as client:
        good = encode(sm.edge.forward(_prompt(2, 4), None, 0), sm.codec).to_bytes()
        wide = bytearray(good)
        HEADER.pack_into(wide, 0, MAGIC, 1, 0, 0, 0, 4, 1 << 24, 0)  # d = 2^24 (CRC not even checked)
        long = bytearray(good)
        HEADER.pack_into(long, 0, MAGIC, 1, 0, 0, 0, 800_000, 32, 0)
        for frame, status, words in ((wide, Status.INVALID_ARGUMENT, "d=16777216"),
                                     (long, Status.RESOURCE_EXHAUSTED, "800000 tokens")):
            session = client.open(Open(SamplingParams()))
            with pytest.raises(SplitError) as e:
                session.step(0, bytes(frame))
            assert e.value.status is status and words in e.value.message, e.value.message
        session = client.open(Open(SamplingParams()))
        assert session.step(0, good).reply.position == 4
        session.close()


class _Silent:
    """A raw Session stream that never sends a message (an unopened stream)."""

    def __init__(self, address: str) -> None:
        self._release = threading.Event()
        self._channel = grpc.insecure_channel(address)

        def nothing():
            self._release.wait(60)
            return
            yield  # a generator that ends without yielding

        self.call = self._channel.stream_stream(SESSION_METHOD)(nothing())
        self.status: grpc.StatusCode | None = None
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        try:
            for _ in self.call:
                pass
        except grpc.RpcError as exc:
            self.status = exc.code()

    def close(self) -> None:
        self._release.set()
        self.call.cancel()
        self._thread.join(10)
        self._channel.close()


def test_unopened_streams_lock_out_neither_info_nor_new_sessions(model):
    sm = split_model(model, 1, limits=Limits(max_sessions=4, max_seq_len=64))
    open_timeout = 5.0
    with GrpcServer(sm.manager, open_timeout_s=open_timeout) as server, GrpcTransport(server.address) as client:
        flood = [_Silent(server.address) for _ in range(8)]  # 2x max_sessions, never send OPEN
        try:
            deadline = time.monotonic() + 10
            while client.info()["waiting_streams"] < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            t0 = time.monotonic()
            info = client.info(timeout_s=open_timeout)
            assert info["sessions"] == 0 and info["waiting_streams"] >= 4
            ids = _prompt(3, 5)
            got = sm.generate(ids, 4, transport=client)
            assert time.monotonic() - t0 < open_timeout
            assert torch.equal(got, sm.generate(ids, 4))
            deadline = time.monotonic() + open_timeout + 10
            while any(s.status is None for s in flood) and time.monotonic() < deadline:
                time.sleep(0.05)
            # Each was evicted by a newer stream or ran out of time to OPEN.
            assert {s.status for s in flood} <= {grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                 grpc.StatusCode.DEADLINE_EXCEEDED}, [s.status for s in flood]
            assert client.info()["waiting_streams"] == 0
        finally:
            for s in flood:
                s.close()


# -- restarts -----------------------------------------------------------------------------------
class _ServeProcess:
    """``splitkernels serve --model tiny`` on a fixed loopback port, as a subprocess."""

    def __init__(self, port: int, *extra: str) -> None:
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen([sys.executable, "-m", "splitkernels", "serve", "--model", "tiny", "--port",
                                      str(port), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env)

    def ready(self) -> str:
        line = self.proc.stdout.readline()
        assert re.search(r"on 127\.0\.0\.1:\d+", line), (line, self.proc.stderr.read() if self.proc.poll() else "")
        return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


class _KillServerAt(Transport):
    """Passes sessions through; when ``sessions`` sessions have all reached step ``at``, it
    SIGKILLs the server and starts a new one on the same port (waiting until it listens), so
    each of them finds its stream broken and must resume."""

    def __init__(self, inner: Transport, at: int, sessions: int, server: list[_ServeProcess], port: int) -> None:
        self.inner, self.at, self.server, self.port = inner, at, server, port
        self._barrier = threading.Barrier(sessions, timeout=120)
        self._lock = threading.Lock()
        self.killed = False

    def _kill_once(self) -> None:
        self._barrier.wait()
        with self._lock:
            if not self.killed:
                self.killed = True
                self.server[0].kill()
                self.server[0] = _ServeProcess(self.port)
                # Waiting keeps the retry budget independent of how slowly a loaded machine starts
                # a process; a server that stays down for a while is covered in test_resume.py.
                self.server[0].ready()

    def open(self, request: Open) -> SessionHandle:
        outer, handle = self, self.inner.open(request)

        class Session(SessionHandle):
            session_id, max_seq_len = handle.session_id, handle.max_seq_len

            def step(self, seq: int, frame: bytes) -> Exchange:
                if seq == outer.at and not outer.killed:
                    outer._kill_once()
                return handle.step(seq, frame)

            def replay(self, frames):
                return handle.replay(frames)

            def close(self) -> None:
                handle.close()

            def cancel(self) -> None:
                handle.cancel()

        return Session()


def test_a_server_killed_mid_generation_is_resumed_with_identical_output():
    """A greedy and a seeded-sampling generation, both in flight when the server is killed."""
    (port,) = free_ports(1)
    server = [_ServeProcess(port)]
    try:
        server[0].ready()
        loaded = load_model("tiny")
        sm = split_model(loaded.model, 2)
        ids = loaded.encode_prompt("resume me")
        runs = {"greedy": {}, "seeded": {"do_sample": True, "top_k": 20, "seed": 11}}
        expected = {name: sm.generate(ids, 10, **kw) for name, kw in runs.items()}  # in process, uninterrupted
        got, errors = {}, []
        with GrpcTransport(f"127.0.0.1:{port}", timeout_s=120) as grpc_transport:
            killer = _KillServerAt(grpc_transport, 4, len(runs), server, port)
            resuming = ResumingTransport(killer, RetryPolicy(attempts=12, initial_s=0.25, max_s=2.0))

            def run(name: str) -> None:
                try:
                    got[name] = sm.generate(ids, 10, transport=resuming, **runs[name])
                except BaseException as exc:  # reported below
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(name,)) for name in runs]
            for t in threads:
                t.start()
            for t in threads:
                t.join(180)
        assert not errors, errors
        assert killer.killed and resuming.resumes == len(runs)
        for name in runs:
            assert torch.equal(got[name], expected[name]), name
    finally:
        server[0].kill()


def test_sigterm_drains_sessions_in_flight():
    (port,) = free_ports(1)
    server = _ServeProcess(port, "--drain", "20")
    try:
        server.ready()
        loaded = load_model("tiny")
        sm = split_model(loaded.model, 2)
        ids = loaded.encode_prompt("drain")
        with GrpcTransport(f"127.0.0.1:{port}", timeout_s=60) as client:
            session = client.open(Open(SamplingParams(), max_len=ids.shape[1] + 2))
            frame = encode(sm.edge.forward(ids, None, 0), sm.codec).to_bytes()
            first = session.step(0, frame).reply
            server.proc.send_signal(signal.SIGTERM)
            assert "SIGTERM: draining 1 session(s)" in server.proc.stdout.readline()
            # The session in flight goes on; a new one is refused.
            nxt = encode(sm.edge.forward(torch.tensor([[first.token]]), None, 0), sm.codec).to_bytes()
            assert session.step(1, nxt).reply.position == ids.shape[1] + 1
            with pytest.raises(SplitError) as e:
                client.open(Open(SamplingParams()))
            assert e.value.status is Status.UNAVAILABLE
            session.close()
        out, err = server.proc.communicate(timeout=60)
        assert server.proc.returncode == 0 and out.strip().endswith("stopped"), err
    finally:
        server.kill()


def test_allocation_failures_are_resource_exhausted(model, monkeypatch):
    import splitkernels.runtime.sessions as sessions_module

    sm = split_model(model, 1)
    frame = encode(sm.edge.forward(_prompt(4, 3), None, 0), sm.codec).to_bytes()
    with GrpcServer(sm.manager) as server, GrpcTransport(server.address) as client:
        for target, name in ((sessions_module, "decode_frame"), (sm.server, "forward")):
            def out_of_memory(*args, **kw):
                raise MemoryError("simulated")

            with monkeypatch.context() as m:
                m.setattr(target, name, out_of_memory)
                session = client.open(Open(SamplingParams()))
                with pytest.raises(SplitError) as e:
                    session.step(0, frame)
            assert e.value.status is Status.RESOURCE_EXHAUSTED and "out of memory" in e.value.message
        assert sm.generate(_prompt(4, 3), 2, transport=client).shape[1] == 5


def test_per_client_session_cap(model):
    sm = split_model(model, 1, limits=Limits(max_sessions=8))
    with GrpcServer(sm.manager, max_sessions_per_client=2) as server, GrpcTransport(server.address) as client:
        held = [client.open(Open(SamplingParams())) for _ in range(2)]
        with pytest.raises(SplitError) as e:
            client.open(Open(SamplingParams()))
        assert e.value.status is Status.RESOURCE_EXHAUSTED and "per-client limit" in e.value.message
        held.pop().close()
        deadline = time.monotonic() + 20
        while sm.manager.num_sessions > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        client.open(Open(SamplingParams())).close()
        held[0].close()
