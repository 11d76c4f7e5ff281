"""Replicas on Ray Serve: ``splitkernels cluster`` (one command) starts a local Ray cluster with two
replicas of a tiny model behind one gRPC address; sessions run concurrently through that address,
each gives the in-process split's tokens, and they land on both replicas; past every replica's
session limit new sessions wait, then are refused; a killed replica fails only its own sessions. Without Ray Serve (the optional ``cluster``
extra, which CI does not install) that test is skipped; the replica's session service (driven here
as Ray drives it), the configuration and command-line checks run everywhere."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from runtime_helpers import free_ports, prompt, wait_for
from splitkernels.cli import main
from splitkernels.codec import CodecConfig, encode
from splitkernels.models import load_model, tiny_model
from splitkernels.runtime import Limits, SplitError, Status, split_model
from splitkernels.runtime.proto import split_pb2
from splitkernels.runtime.protocol import Open, SamplingParams, Step
from splitkernels.runtime.ray_serve import ClusterConfig, ReplicaSessions, ray_serve_available, transport

TOKEN = "cluster-token"
SEED, SPLIT = 11, 1


class _Context:
    """What a replica sees of a call: its metadata, and the status it sets."""

    def __init__(self, token: str | None = TOKEN) -> None:
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.code = self.details = None

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


def _requests(*items, hold: float | None = None):
    """An async request stream of ``items``; with ``hold``, it then stays open that long."""
    async def stream():
        for item in items:
            yield item
        if hold is not None:
            await asyncio.sleep(hold)
    return stream()


def _open(max_len: int = 0) -> split_pb2.Request:
    return split_pb2.Request(open=split_pb2.Open(sampling=split_pb2.Sampling(), max_len=max_len))


def _step(seq: int, frame: bytes) -> split_pb2.Request:
    return split_pb2.Request(step=split_pb2.Step(seq=seq, frame=frame))


async def _drive(service: ReplicaSessions, requests, context: _Context) -> tuple[list, str | None]:
    """Run one Session call as Ray Serve does; its replies and the status it ended with."""
    replies = []
    try:
        async for reply in service.Session(requests, context):
            replies.append(reply)
    except Exception:
        assert context.code is not None, "a refusal must set its status"
        return replies, context.code.name
    return replies, None


@pytest.fixture()
def service():
    sm = split_model(tiny_model("llama", seed=3, num_layers=3, hidden=32), 1,
                     limits=Limits(max_sessions=2, max_seq_len=32, idle_timeout_s=0.3))
    sm.manager.start_reaper()
    s = ReplicaSessions(sm.manager, {"model": "tiny"}, TOKEN, open_timeout_s=0.3)
    yield sm, s
    s.shutdown()


def test_replica_sessions_serve_the_proto_service(service):
    sm, s = service
    frames = [encode(torch.randn(n, sm.adapter.hidden_size), CodecConfig.passthrough()).to_bytes() for n in (3, 1, 1)]
    reference = sm.manager.open(Open(SamplingParams()))
    expected = [sm.manager.step(Step(reference.session_id, i, f)).token for i, f in enumerate(frames)]
    sm.manager.close(reference.session_id)
    close = split_pb2.Request(close=split_pb2.Close())
    replies, status = asyncio.run(_drive(s, _requests(_open(8), *(_step(i, f) for i, f in enumerate(frames)), close),
                                         _Context()))
    assert status is None and replies[0].opened.max_seq_len == 32
    assert [r.token.token for r in replies[1:]] == expected and replies[-1].token.position == 5
    assert sm.manager.num_sessions == 0
    info = json.loads(asyncio.run(s.Info(split_pb2.InfoRequest(), _Context())).json)
    assert info["model"] == "tiny" and info["sessions_opened"] == 2 and info["fingerprint"] == sm.fingerprint.hex()

    # Refusals end the stream with their status and free the session.
    for requests, context, want in (
            (_requests(_open()), _Context("wrong"), "UNAUTHENTICATED"),
            (_requests(_step(0, frames[0])), _Context(), "FAILED_PRECONDITION"),
            (_requests(_open(100)), _Context(), "RESOURCE_EXHAUSTED"),
            (_requests(_open(), _step(1, frames[0])), _Context(), "INVALID_ARGUMENT"),
            (_requests(_open(), _open()), _Context(), "FAILED_PRECONDITION"),
            (_requests(hold=5), _Context(), "DEADLINE_EXCEEDED"),  # no Open within open_timeout_s
            (_requests(_open(), hold=5), _Context(), "CANCELLED")):  # idle: the session expires
        replies, status = asyncio.run(_drive(s, requests, context))
        assert status == want, context.details
        assert wait_for(lambda: sm.manager.num_sessions == 0, 5)
    assert "expired" in context.details
    # A stream that just ends (the client went away) frees its session.
    replies, status = asyncio.run(_drive(s, _requests(_open(), _step(0, frames[0])), _Context()))
    assert status is None and len(replies) == 2 and wait_for(lambda: sm.manager.num_sessions == 0, 5)


def test_cluster_config_is_checked():
    ClusterConfig(replicas=1, port=1, http_port=2)
    for kw, field in (({"replicas": 0}, "replicas"), ({"max_sessions": True}, "max_sessions"),
                      ({"port": 70000}, "port"), ({"port": 9000, "http_port": 9000}, "differ"),
                      ({"app_name": "a/b"}, "app_name"), ({"replica_cpus": 0}, "replica_cpus"),
                      ({"open_timeout_s": 0}, "open_timeout_s"), ({"max_waiting": 0}, "max_waiting")):
        with pytest.raises(ValueError, match=field):
            ClusterConfig(**kw)


def test_cluster_command_refuses_bad_flags(capsys):
    assert main(["cluster", "--model", "tiny"]) == 2
    assert "--token" in capsys.readouterr().err  # the proxy listens on every interface
    assert main(["cluster", "--model", "tiny", "--insecure", "--metrics-port", "0"]) == 2
    assert "--metrics-port" in capsys.readouterr().err
    assert main(["cluster", "--model", "tiny", "--insecure", "--port", "8000"]) == 2
    assert "differ" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cluster():
    """``splitkernels cluster`` with two replicas of the tiny model, in its own process group; yields
    (address, the process, its output so far)."""
    port, http_port = free_ports(2)
    cmd = [sys.executable, "-m", "splitkernels", "cluster", "--model", "tiny", "--seed", str(SEED),
           "--split-layer", str(SPLIT), "--replicas", "2", "--max-sessions", "4", "--max-seq-len", "64",
           "--port", str(port), "--http-port", str(http_port), "--token", TOKEN, "--replica-cpus", "1",
           "--max-waiting", "8"]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving "):
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(420) and proc.poll() is None, "cluster did not start:\n" + "".join(lines[-30:])
        yield f"127.0.0.1:{port}", proc, lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(not ray_serve_available(),
                    reason='Ray Serve (ray[serve] >= 2.60, the optional extra: pip install ".[cluster]") is not installed')
def test_two_replicas_behind_one_address(cluster):
    address, proc, lines = cluster
    sm = split_model(load_model("tiny", "llama", SEED).model, SPLIT)  # the same seeded model, in process
    # (prompt length, new tokens, sampling seed or None for greedy): 8 sessions of different lengths.
    runs = [(n, new, None if n % 3 else n) for n, new in zip(range(1, 9), (12, 3, 7, 9, 1, 5, 10, 4))]
    results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    errors: list[BaseException] = []
    with transport(address, token=TOKEN, timeout_s=120) as client:
        def run(length: int, new: int, seed: int | None) -> None:
            try:
                ids = prompt(length, length, vocab=120)
                sampling = dict(do_sample=True, top_k=30, seed=seed) if seed is not None else {}
                results[length] = sm.generate(ids, new, transport=client, **sampling), sm.generate(ids, new, **sampling)
            except BaseException as exc:  # reported below with the cluster's output
                errors.append(exc)

        threads = [threading.Thread(target=run, args=r) for r in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, f"{errors[0]!r}\n" + "".join(lines[-30:])
        for length, (remote, local) in results.items():
            assert torch.equal(remote, local), f"session with a {length}-token prompt differs from in-process"

        # Info answers from either replica: poll until both have answered, then count their sessions.
        opened: dict[str, int] = {}
        deadline = time.monotonic() + 60
        while len(opened) < 2 and time.monotonic() < deadline:
            info = client.info()
            assert info["sessions"] == 0 and info["fingerprint"] == sm.fingerprint.hex()
            opened[info["replica"]] = info["sessions_opened"]
        assert len(opened) == 2 and all(n > 0 for n in opened.values()), f"sessions per replica: {opened}"
        assert sum(opened.values()) == len(runs)

        session = client.open(Open(SamplingParams()))  # a client that drops its stream frees its session
        session.cancel()
        with transport(address, token="wrong") as bad:
            with pytest.raises(SplitError) as e:
                bad.open(Open(SamplingParams()))
            assert e.value.status is Status.UNAUTHENTICATED
        with pytest.raises(SplitError) as e:
            client.open(Open(SamplingParams(), max_len=1000))
        assert e.value.status is Status.RESOURCE_EXHAUSTED and "64" in e.value.message
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(client.info()["sessions"] for _ in range(4)):
            time.sleep(0.2)
        assert all(client.info()["sessions"] == 0 for _ in range(6))

        # Every replica full (2 x 4 sessions): 8 more sessions wait for a slot (--max-waiting 8; it
        # also bounds a burst of new sessions, which wait in the proxy while it routes them), the
        # next is refused, and the waiting ones open as sessions close.
        held = [client.open(Open(SamplingParams())) for _ in range(8)]
        waiting: list = []
        waiters = [threading.Thread(target=lambda: waiting.append(client.open(Open(SamplingParams()))))
                   for _ in range(8)]
        for w in waiters:
            w.start()
        time.sleep(3.0)
        assert not waiting, "a ninth session opened although both replicas hold 4 (--max-sessions)"
        with pytest.raises(SplitError) as e:
            client.open(Open(SamplingParams()))
        assert e.value.status is Status.RESOURCE_EXHAUSTED
        for session in held:
            session.close()
        for w in waiters:
            w.join(60)
        assert len(waiting) == 8
        for session in waiting:
            session.close()


def _by_replica(client, sessions: set[int], timeout_s: float = 60) -> dict[int, int]:
    """Replica pid of each of ``sessions``, from the replicas' Info (any replica answers; poll
    until every session is placed)."""
    owner: dict[int, int] = {}
    deadline = time.monotonic() + timeout_s
    while not sessions <= set(owner) and time.monotonic() < deadline:
        info = client.info()
        owner.update({int(s["id"], 16): info["pid"] for s in info["per_session"]})
    assert sessions <= set(owner), f"sessions not found in any replica's Info: {sessions - set(owner)}"
    return owner


@pytest.mark.slow
@pytest.mark.skipif(not ray_serve_available(),
                    reason='Ray Serve (ray[serve] >= 2.60, the optional extra: pip install ".[cluster]") is not installed')
def test_a_killed_replica_fails_only_its_sessions(cluster):
    """SIGKILL one replica: its sessions' next steps fail at once with a clear status, the other
    replica's sessions go on with the right tokens, and new sessions open on a live replica."""
    address, proc, lines = cluster
    sm = split_model(load_model("tiny", "llama", SEED).model, SPLIT)
    d = sm.adapter.hidden_size
    gen = torch.Generator().manual_seed(0)
    frames = [encode(torch.randn(n, d, generator=gen), CodecConfig.passthrough()).to_bytes() for n in (3, 1, 1)]
    reference = sm.manager.open(Open(SamplingParams()))
    expected = [sm.manager.step(Step(reference.session_id, i, f)).token for i, f in enumerate(frames)]
    with transport(address, token=TOKEN, timeout_s=120) as client:
        # 6 sessions on replicas of 4 slots each: both replicas hold some.
        sessions = [client.open(Open(SamplingParams())) for _ in range(6)]
        for s in sessions:
            assert s.step(0, frames[0]).reply.token == expected[0]
        owner = _by_replica(client, {s.session_id for s in sessions})
        victim = owner[sessions[0].session_id]
        doomed = [s for s in sessions if owner[s.session_id] == victim]
        alive = [s for s in sessions if owner[s.session_id] != victim]
        assert doomed and alive, f"sessions per replica: {owner}"
        os.kill(victim, signal.SIGKILL)
        for s in doomed:
            t0 = time.monotonic()
            with pytest.raises(SplitError) as e:
                s.step(1, frames[1])
            assert time.monotonic() - t0 < 30, "a step on the dead replica hung"
            # Ray Serve's proxy ends the stream with INTERNAL "The actor died unexpectedly ...".
            assert e.value.status in (Status.UNAVAILABLE, Status.INTERNAL) and "died" in e.value.message, e.value
        for s in alive:
            assert [s.step(i, f).reply.token for i, f in enumerate(frames[1:], start=1)] == expected[1:]
        fresh = [client.open(Open(SamplingParams())) for _ in range(2)]  # on a live replica: their steps work
        for s in fresh:
            assert [s.step(i, f).reply.token for i, f in enumerate(frames)] == expected
        assert all(client.info()["pid"] != victim for _ in range(4))
        for s in alive + fresh:
            s.close()


@pytest.mark.slow
@pytest.mark.skipif(not ray_serve_available(),
                    reason='Ray Serve (ray[serve] >= 2.60, the optional extra: pip install ".[cluster]") is not installed')
def test_cluster_stops_on_sigterm(cluster):
    address, proc, lines = cluster
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0
    assert "stopped" in "".join(lines[-5:])
