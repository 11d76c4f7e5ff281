"""The ``.proto`` face of the server (``proto/split.proto``, service ``splitkernels.runtime.v1.Split``),
served alongside the struct-protocol service on the same port, plus the standard gRPC health
service (``grpc.health.v1.Health``) and server reflection, so clients in any language can be
generated and tools like grpcurl can list and call the service.

Same session semantics as the struct service: OPEN -> OPENED, STEP -> TOKEN per token, CLOSE; the
session lives as long as its stream; errors are gRPC status codes with a message.

The Python stubs in ``proto/`` are generated from ``split.proto`` and checked in (regenerate with
``python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=.
splitkernels/runtime/proto/split.proto`` from the repository root; a test checks they match).
"""
from __future__ import annotations

import json
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .proto import split_pb2, split_pb2_grpc
from .protocol import FINGERPRINT_BYTES, Open, Opened, SamplingParams, SplitError, Status, Step, TokenReply
from .sessions import NO_FINGERPRINT, SessionManager

SERVICE = split_pb2.DESCRIPTOR.services_by_name["Split"].full_name


def _sampling(msg: split_pb2.Sampling) -> SamplingParams:
    # proto3 scalars default to 0: an unset temperature or top_p means 1.0 (no change).
    try:
        return SamplingParams(msg.do_sample, msg.temperature or 1.0, msg.top_k, msg.top_p or 1.0,
                              msg.seed if msg.HasField("seed") else None)
    except ValueError as exc:
        raise SplitError(Status.INVALID_ARGUMENT, f"Open.sampling: {exc}") from None


def open_request(msg: split_pb2.Open) -> Open:
    """The protocol OPEN a ``.proto`` Open asks for; INVALID_ARGUMENT naming the bad field."""
    fp = msg.fingerprint or NO_FINGERPRINT
    if len(fp) != FINGERPRINT_BYTES:
        raise SplitError(Status.INVALID_ARGUMENT,
                         f"Open.fingerprint must be {FINGERPRINT_BYTES} bytes or empty, got {len(fp)}")
    return Open(_sampling(msg.sampling), fp, msg.max_len, codec_config=msg.codec_config)


def opened_reply(opened: Opened) -> split_pb2.Reply:
    return split_pb2.Reply(opened=split_pb2.Opened(session_id=opened.session_id, max_seq_len=opened.max_seq_len))


def token_reply(r: TokenReply) -> split_pb2.Reply:
    return split_pb2.Reply(token=split_pb2.Token(seq=r.seq, token=r.token, position=r.position, decode_s=r.decode_s,
                                                 compute_s=r.compute_s, kv_bytes=r.kv_bytes))


class SplitServicer(split_pb2_grpc.SplitServicer):
    """``splitkernels.runtime.v1.Split`` over a :class:`SessionManager`.

    ``authenticate(context)`` aborts an unauthenticated call; ``info()`` is the Info body (a dict).
    """

    def __init__(self, manager: SessionManager, authenticate: Callable[[grpc.ServicerContext], None],
                 info: Callable[[], dict]) -> None:
        self.manager, self._authenticate, self._info = manager, authenticate, info

    def Info(self, request: split_pb2.InfoRequest, context: grpc.ServicerContext) -> split_pb2.InfoReply:
        self._authenticate(context)
        return split_pb2.InfoReply(json=json.dumps(self._info()))

    def Session(self, requests, context: grpc.ServicerContext):
        self._authenticate(context)
        owned: list[int] = []  # the stream's session, freed however the stream ends

        def release() -> None:
            while owned:
                self.manager.close(owned.pop())

        context.add_callback(release)
        try:
            for request in requests:
                try:
                    kind = request.WhichOneof("kind")
                    if kind == "open":
                        if owned:
                            raise SplitError(Status.FAILED_PRECONDITION, "this stream already has a session")
                        opened = self.manager.open(open_request(request.open), on_expire=context.cancel)
                        owned.append(opened.session_id)
                        yield opened_reply(opened)
                    elif kind == "step":
                        if not owned:
                            raise SplitError(Status.FAILED_PRECONDITION, "Step before Open on this stream")
                        yield token_reply(self.manager.step(Step(owned[0], request.step.seq, request.step.frame)))
                    elif kind == "close":
                        return
                    else:
                        raise SplitError(Status.INVALID_ARGUMENT, "Request carries none of open, step, close")
                except SplitError as exc:
                    release()
                    context.abort(getattr(grpc.StatusCode, exc.status.value), exc.message)
        finally:
            release()


def add_services(server: grpc.Server, manager: SessionManager, authenticate: Callable[[grpc.ServicerContext], None],
                 info: Callable[[], dict], other_services: tuple[str, ...] = ()) -> health.HealthServicer:
    """Register the proto service, health (SERVING for ``""``, the proto service and
    ``other_services``) and reflection on ``server`` (before it starts); returns the health
    servicer (call ``enter_graceful_shutdown()`` on it when stopping)."""
    split_pb2_grpc.add_SplitServicer_to_server(SplitServicer(manager, authenticate, info), server)
    checker = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    for name in ("", SERVICE, *other_services):
        checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return checker
