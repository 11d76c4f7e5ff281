"""The .proto service: checked-in stubs match split.proto, a client generated from the .proto alone
(in a process that never imports splitkernels) completes a session with the right tokens, health
and reflection answer, errors are status codes."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from splitkernels.codec import CodecConfig, encode
from splitkernels.models import tiny_model
from splitkernels.runtime import Limits, split_model
from splitkernels.runtime.batching import BatchingSessionManager
from splitkernels.runtime.grpc_transport import GrpcServer
from splitkernels.runtime.proto import split_pb2, split_pb2_grpc
from splitkernels.runtime.proto_service import SERVICE

PROTO = Path(__file__).resolve().parents[1] / "splitkernels" / "runtime" / "proto" / "split.proto"
grpc_tools = pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) generates the stubs")
from grpc_tools import protoc  # noqa: E402


@pytest.fixture(scope="module")
def sm():
    return split_model(tiny_model("llama", seed=9, num_layers=3, hidden=32), 1,
                       limits=Limits(max_sessions=4, max_seq_len=128))


@pytest.fixture(params=["unbatched", "batched"])
def server(sm, request):
    manager = sm.manager if request.param == "unbatched" else BatchingSessionManager(sm.server, sm.manager.limits,
                                                                                     sm.fingerprint)
    s = GrpcServer(manager).start()
    yield s
    s.stop(0)


def _protoc(*args: str) -> None:
    assert protoc.main(["protoc", f"-I{PROTO.parent}", *args, str(PROTO)]) == 0


def test_checked_in_stubs_match_the_proto(tmp_path):
    _protoc(f"--descriptor_set_out={tmp_path / 'set.pb'}")
    fresh = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "set.pb").read_bytes()).file[0]
    shipped = descriptor_pb2.FileDescriptorProto.FromString(split_pb2.DESCRIPTOR.serialized_pb)
    fresh.name = shipped.name  # protoc names the file by its -I relative path
    for message in fresh.message_type:  # a descriptor set spells out json names; the stubs derive them
        for f in message.field:
            f.ClearField("json_name")
    assert fresh == shipped, "split_pb2.py is stale: regenerate it (see proto_service.py)"


CLIENT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import grpc
    sys.path.insert(0, sys.argv[1])
    import split_pb2, split_pb2_grpc
    folder, address = Path(sys.argv[1]), sys.argv[2]
    frames = [p.read_bytes() for p in sorted(folder.glob("frame_*.bin"))]
    with grpc.insecure_channel(address) as channel:
        stub = split_pb2_grpc.SplitStub(channel)
        def requests():
            yield split_pb2.Request(open=split_pb2.Open(sampling=split_pb2.Sampling(), max_len=64))
            for seq, frame in enumerate(frames):
                yield split_pb2.Request(step=split_pb2.Step(seq=seq, frame=frame))
            yield split_pb2.Request(close=split_pb2.Close())
        replies = list(stub.Session(requests(), timeout=60))
        info = json.loads(stub.Info(split_pb2.InfoRequest(), timeout=10).json)
    assert replies[0].WhichOneof("kind") == "opened"
    assert not any(m.startswith("splitkernels") for m in sys.modules), "the client must not use the package"
    print(json.dumps({"tokens": [r.token.token for r in replies[1:]],
                      "positions": [r.token.position for r in replies[1:]], "sessions": info["sessions"]}))
""")


def test_client_generated_from_the_proto_alone_completes_a_session(sm, server, tmp_path):
    _protoc(f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}")
    ids = torch.randint(0, 255, (1, 6), generator=torch.Generator().manual_seed(2))
    new = sm.generate(ids, 8)[0, 6:].tolist()
    # The edge's frames for the prompt and each generated token but the last (what an edge sends).
    cache, feed, position = sm.edge.new_cache(), ids, 0
    for i in range(len(new)):
        hidden = sm.edge.forward(feed, cache, position)
        (tmp_path / f"frame_{i:03d}.bin").write_bytes(encode(hidden, CodecConfig.passthrough()).to_bytes())
        position += feed.shape[1]
        feed = torch.tensor([[new[i]]])
    done = subprocess.run([sys.executable, "-c", CLIENT, str(tmp_path), server.address],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["tokens"] == new
    assert out["positions"] == [6 + i for i in range(len(new))]


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        for name in ("", SERVICE, "splitkernels.runtime.Split"):
            assert check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        db = ProtoReflectionDescriptorDatabase(channel)
        assert SERVICE in db.get_services()
        assert db.FindFileContainingSymbol(SERVICE).name == split_pb2.DESCRIPTOR.name


def test_proto_errors_are_status_codes(server):
    with grpc.insecure_channel(server.address) as channel:
        session = split_pb2_grpc.SplitStub(channel).Session
        cases = [
            ([split_pb2.Request(step=split_pb2.Step(seq=0, frame=b"x"))], grpc.StatusCode.FAILED_PRECONDITION),
            ([split_pb2.Request()], grpc.StatusCode.INVALID_ARGUMENT),
            ([split_pb2.Request(open=split_pb2.Open(fingerprint=b"short"))], grpc.StatusCode.INVALID_ARGUMENT),
            ([split_pb2.Request(open=split_pb2.Open(sampling=split_pb2.Sampling(top_p=2.0)))],
             grpc.StatusCode.INVALID_ARGUMENT),
            ([split_pb2.Request(open=split_pb2.Open()), split_pb2.Request(step=split_pb2.Step(seq=0, frame=b"junk"))],
             grpc.StatusCode.INVALID_ARGUMENT),
            ([split_pb2.Request(open=split_pb2.Open(max_len=10_000))], grpc.StatusCode.RESOURCE_EXHAUSTED),
        ]
        for requests, code in cases:
            with pytest.raises(grpc.RpcError) as e:
                list(session(iter(requests), timeout=30))
            assert e.value.code() == code, (requests, e.value.details())
    assert server.manager.num_sessions == 0
