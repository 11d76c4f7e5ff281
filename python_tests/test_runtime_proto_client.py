"""ProtoTransport, the edge's client of the .proto service (the one the Ray Serve replicas speak):
generation through it equals the in-process split (greedy and seeded sampling), errors are
SplitError statuses, a cancelled stream frees its session, speculative steps are refused."""
from __future__ import annotations

import pytest
import torch

from runtime_helpers import prompt, wait_for
from splitkernels.codec import CodecConfig, encode
from splitkernels.models import tiny_model
from splitkernels.runtime import Limits, SplitError, Status, split_model
from splitkernels.runtime.grpc_transport import GrpcServer
from splitkernels.runtime.proto_client import ProtoTransport
from splitkernels.runtime.protocol import Open, SamplingParams

TOKEN = "proto-token"


@pytest.fixture(scope="module")
def served():
    sm = split_model(tiny_model("qwen2", seed=5, num_layers=3, hidden=32), 2,
                     limits=Limits(max_sessions=3, max_seq_len=64))
    server = GrpcServer(sm.manager, token=TOKEN).start()
    yield sm, server
    server.stop(0)


def _status(fn) -> Status:
    with pytest.raises(SplitError) as e:
        fn()
    return e.value.status


def test_generation_through_the_proto_service_equals_in_process(served):
    sm, server = served
    with ProtoTransport(server.address, token=TOKEN) as client:
        for length, new in ((1, 5), (9, 11)):
            ids = prompt(length, length, vocab=128)
            remote = sm.generate(ids, new, transport=client)
            steps = sm.last_metrics.steps
            assert all(s.bytes_up > s.frame_bytes and s.bytes_down > 0 for s in steps) and len(steps) == new
            assert torch.equal(remote, sm.generate(ids, new))
            assert torch.equal(sm.generate(ids, new, do_sample=True, top_p=0.9, seed=length, transport=client),
                               sm.generate(ids, new, do_sample=True, top_p=0.9, seed=length))
        assert client.info()["sessions"] == 0


def test_errors_are_statuses_and_a_cancelled_stream_frees_its_session(served):
    sm, server = served
    with ProtoTransport(server.address, token="wrong") as bad:
        assert _status(lambda: bad.open(Open(SamplingParams()))) is Status.UNAUTHENTICATED
    with ProtoTransport(server.address, token=TOKEN) as client:
        assert _status(lambda: client.open(Open(SamplingParams(), bytes(range(16))))) is Status.FAILED_PRECONDITION
        assert _status(lambda: client.open(Open(SamplingParams(), max_len=10_000))) is Status.RESOURCE_EXHAUSTED
        session = client.open(Open(SamplingParams(), max_len=8))
        hidden = torch.randn(2, sm.adapter.hidden_size)
        frame = encode(hidden, CodecConfig.passthrough()).to_bytes()
        assert session.step(0, frame).reply.position == 2
        assert _status(lambda: session.step(5, frame)) is Status.INVALID_ARGUMENT  # wrong seq ends the stream
        assert wait_for(lambda: sm.manager.num_sessions == 0)
        other = client.open(Open(SamplingParams()))
        assert _status(lambda: other.verify(0, (1,), frame)) is Status.FAILED_PRECONDITION
        assert sm.manager.num_sessions == 1
        other.cancel()
        assert wait_for(lambda: sm.manager.num_sessions == 0)
    with pytest.raises(ValueError, match="target"):
        ProtoTransport("nohost")
