"""Split runtime over gRPC on loopback: exactness, status codes, limits, auth, TLS, deadlines,
killed clients, corrupted and oversized frames, and many concurrent sessions."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from runtime_helpers import prompt as _prompt, wait_for as _wait_for
from splitkernels.codec import encode
from splitkernels.models import tiny_model
from splitkernels.runtime import Limits, SessionManager, SplitError, Status, split_model
from splitkernels.runtime.grpc_transport import GrpcServer, GrpcTransport, TlsFiles
from splitkernels.runtime.protocol import Open, SamplingParams, Step, TokenReply, encode_message

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=21, num_layers=2, hidden=32)


@pytest.fixture()
def served(model):
    """A split model whose in-process SessionManager is served over gRPC; yields (sm, server)."""
    sm = split_model(model, 1, limits=Limits(max_sessions=20, max_seq_len=256))
    server = GrpcServer(sm.manager, token=TOKEN, max_message_bytes=1 << 16).start()
    yield sm, server
    server.stop(0)


def _client(server, **kw) -> GrpcTransport:
    return GrpcTransport(server.address, token=kw.pop("token", TOKEN), **kw)


def _status(fn) -> Status:
    with pytest.raises(SplitError) as e:
        fn()
    return e.value.status


def test_grpc_generation_equals_in_process(served, model):
    sm, server = served
    with _client(server) as client:
        ids = _prompt(1, 7)
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        assert torch.equal(sm.generate(ids, 12, transport=client), expected)
        sampled = sm.generate(ids, 12, do_sample=True, top_k=20, seed=4, transport=client)
        assert torch.equal(sampled, sm.generate(ids, 12, do_sample=True, top_k=20, seed=4))
        info = client.info()
        assert info["sessions"] == 0 and info["fingerprint"] == sm.fingerprint.hex()
        assert info["rss_bytes"] > 0 and info["weight_bytes"] == sm.server.weight_bytes()


def test_wrong_or_missing_token_is_refused(served):
    sm, server = served
    for token in ("wrong", None):
        with _client(server, token=token) as client:
            assert _status(lambda: client.open(Open(SamplingParams()))) is Status.UNAUTHENTICATED
            assert _status(client.info) is Status.UNAUTHENTICATED
    assert sm.manager.num_sessions == 0


def test_bad_and_oversized_frames_end_only_their_session(served, model):
    sm, server = served
    with _client(server) as client:
        bystander = client.open(Open(SamplingParams(), sm.fingerprint))
        ids = _prompt(2, 5)
        good = encode(sm.edge.forward(ids, None, 0), sm.codec).to_bytes()
        corrupted = bytearray(good)
        corrupted[len(good) // 2] ^= 0xFF
        for frame, status in ((bytes(corrupted), Status.INVALID_ARGUMENT), (b"nonsense", Status.INVALID_ARGUMENT),
                              (good[:-3], Status.INVALID_ARGUMENT), (bytes(70_000), Status.RESOURCE_EXHAUSTED)):
            session = client.open(Open(SamplingParams()))
            with pytest.raises(SplitError) as e:
                session.step(0, frame)
            assert e.value.status is status and e.value.message
            assert _status(lambda: session.step(0, good)) is Status.FAILED_PRECONDITION  # that stream is over
        assert _wait_for(lambda: sm.manager.num_sessions == 1)
        # The server and the other session go on, with the right answer.
        assert bystander.step(0, good).reply.token == int(model(ids).logits[0, -1].argmax())
        bystander.close()
        assert torch.equal(sm.generate(ids, 4, transport=client), sm.generate(ids, 4))


def test_unknown_session_limits_and_fingerprint(model):
    sm = split_model(model, 1, limits=Limits(max_sessions=1, max_seq_len=8))
    with GrpcServer(sm.manager) as server, GrpcTransport(server.address) as client:
        session = client.open(Open(SamplingParams()))
        assert _status(lambda: client.open(Open(SamplingParams()))) is Status.RESOURCE_EXHAUSTED
        frame = encode(sm.edge.forward(_prompt(3, 3), None, 0), sm.codec).to_bytes()
        assert _status(lambda: session._exchange(encode_message(Step(session.session_id ^ 1, 0, frame)),
                                                 TokenReply)) is Status.NOT_FOUND
        assert _wait_for(lambda: sm.manager.num_sessions == 0)
        other = split_model(tiny_model("llama", seed=22, num_layers=2, hidden=32), 1)
        assert _status(lambda: other.generate(_prompt(3, 3), 2, transport=client)) is Status.FAILED_PRECONDITION
        assert _status(lambda: client.open(Open(SamplingParams(), max_len=9))) is Status.RESOURCE_EXHAUSTED
        assert _status(lambda: sm.generate(_prompt(3, 6), 4, transport=client)) is Status.RESOURCE_EXHAUSTED
        assert torch.equal(sm.generate(_prompt(3, 6), 3, transport=client), sm.generate(_prompt(3, 6), 3))


def test_idle_timeout_ends_session_and_stream(model):
    sm = split_model(model, 1, limits=Limits(idle_timeout_s=0.5))
    with GrpcServer(sm.manager) as server, GrpcTransport(server.address) as client:
        session = client.open(Open(SamplingParams()))
        assert _wait_for(lambda: sm.manager.num_sessions == 0)
        frame = encode(sm.edge.forward(_prompt(3, 3), None, 0), sm.codec).to_bytes()
        # The server cancelled the stream, so an idle client holds no server thread.
        assert _status(lambda: session.step(0, frame)) is Status.CANCELLED
        assert torch.equal(sm.generate(_prompt(3, 3), 3, transport=client), sm.generate(_prompt(3, 3), 3))


def test_deadline_ends_the_session(model):
    sm = split_model(model, 1)
    with GrpcServer(sm.manager) as server, GrpcTransport(server.address, timeout_s=1.5) as client:
        session = client.open(Open(SamplingParams()))
        time.sleep(2.0)
        frame = encode(sm.edge.forward(_prompt(3, 3), None, 0), sm.codec).to_bytes()
        assert _status(lambda: session.step(0, frame)) is Status.DEADLINE_EXCEEDED
        assert _wait_for(lambda: sm.manager.num_sessions == 0)


CHILD = """
import importlib.util, sys, time
import grpc
spec = importlib.util.spec_from_file_location("protocol", sys.argv[2])
p = sys.modules["protocol"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(p)
frame = open(sys.argv[3], "rb").read()
queue = []
def requests():
    while True:
        while not queue:
            time.sleep(0.005)
        yield queue.pop(0)
call = grpc.insecure_channel(sys.argv[1]).stream_stream("/splitkernels.runtime.Split/Session")(
    requests(), metadata=(("authorization", "Bearer " + sys.argv[4]),))
queue.append(p.encode_message(p.Open(p.SamplingParams())))
sid = p.decode_message(next(call)).session_id
queue.append(p.encode_message(p.Step(sid, 0, frame)))
next(call)
print("stepped", flush=True)
time.sleep(120)
"""


def test_killed_client_frees_its_session_while_others_continue(served, model, tmp_path: Path):
    sm, server = served
    import splitkernels.runtime.protocol as protocol_module

    ids = _prompt(5, 6)
    frame_path = tmp_path / "frame.bin"
    frame_path.write_bytes(encode(sm.edge.forward(ids, None, 0), sm.codec).to_bytes())
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    child = subprocess.Popen([sys.executable, str(script), server.address, protocol_module.__file__, str(frame_path),
                              TOKEN], stdout=subprocess.PIPE, text=True)
    try:
        with _client(server) as client:
            other = client.open(Open(SamplingParams()))
            assert child.stdout.readline().strip() == "stepped"
            assert _wait_for(lambda: sm.manager.num_sessions == 2)
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
            assert _wait_for(lambda: sm.manager.num_sessions == 1)
            assert other.step(0, frame_path.read_bytes()).reply.token == int(model(ids).logits[0, -1].argmax())
            other.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_sixteen_concurrent_sessions(served, model):
    sm, server = served
    prompts = [_prompt(100 + i, 1 + i % 5) for i in range(16)]
    expected = [model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=50, do_sample=False)
                for p in prompts]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    peak = []

    with _client(server, timeout_s=300.0) as client:
        def run(i: int) -> None:
            try:
                results[i] = sm.generate(prompts[i], 50, transport=client)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak.append(sm.manager.num_sessions)
            time.sleep(0.01)
        for t in threads:
            t.join()
    assert not errors, errors
    for i in range(16):
        assert torch.equal(results[i], expected[i]), i
    assert max(peak) > 1  # they really overlapped
    assert sm.manager.num_sessions == 0 and sm.manager.kv_bytes_total() == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test certificate")
def test_tls(model, tmp_path: Path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    sm = split_model(model, 1)
    tls = TlsFiles.from_paths(str(cert), str(key), str(cert))
    with GrpcServer(sm.manager, tls=tls, token=TOKEN) as server:
        with GrpcTransport(server.address, token=TOKEN, tls=tls, server_name="localhost") as client:
            ids = _prompt(7, 4)
            assert torch.equal(sm.generate(ids, 5, transport=client), sm.generate(ids, 5))
        with GrpcTransport(server.address, token=TOKEN, timeout_s=5.0) as plaintext:
            assert _status(lambda: plaintext.open(Open(SamplingParams()))) is Status.UNAVAILABLE
    with pytest.raises(ValueError, match="private_key"):
        GrpcServer(sm.manager, tls=TlsFiles(cert_chain=b"x"))


def test_server_arguments_are_checked(model):
    sm = split_model(model, 1)
    with pytest.raises(TypeError, match="manager"):
        GrpcServer(object())
    with pytest.raises(ValueError, match="max_message_bytes"):
        GrpcServer(sm.manager, max_message_bytes=10)
    assert isinstance(sm.manager, SessionManager)
