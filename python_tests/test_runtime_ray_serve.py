"""Replicas on Ray Serve: ``splitkernels cluster`` (one command) starts a local Ray cluster with two
replicas of a tiny model behind one gRPC address; sessions run concurrently through that address,
each gives the in-process split's tokens, and they land on both replicas. Without Ray Serve (the
optional ``cluster`` extra, which CI does not install) the cluster test is skipped; the
configuration and command-line checks run everywhere."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from runtime_helpers import prompt
from splitkernels.cli import main
from splitkernels.models import load_model
from splitkernels.runtime import SplitError, Status, split_model
from splitkernels.runtime.protocol import Open, SamplingParams
from splitkernels.runtime.ray_serve import ClusterConfig, ray_serve_available, transport

TOKEN = "cluster-token"
SEED, SPLIT = 11, 1


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


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def cluster():
    """``splitkernels cluster`` with two replicas of the tiny model, in its own process group; yields
    (address, the process, its output so far)."""
    port, http_port = _free_ports(2)
    cmd = [sys.executable, "-m", "splitkernels", "cluster", "--model", "tiny", "--seed", str(SEED),
           "--split-layer", str(SPLIT), "--replicas", "2", "--max-sessions", "4", "--max-seq-len", "64",
           "--port", str(port), "--http-port", str(http_port), "--token", TOKEN, "--replica-cpus", "1"]
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
                    reason='Ray Serve (ray[serve] >= 2.60) is not installed: the optional extra, pip install ".[cluster]"')
def test_two_replicas_behind_one_address(cluster):
    address, proc, lines = cluster
    sm = split_model(load_model("tiny", "llama", SEED).model, SPLIT)  # the same seeded model, in process
    runs = [(length, new, None if length % 3 else length) for length, new in zip(range(1, 9), (12, 3, 7, 9, 1, 5, 10, 4))]
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
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0
    assert "stopped" in "".join(lines[-5:])
