"""The edge's client of the ``.proto`` service (``splitkernels.runtime.v1.Split``, ``proto/split.proto``):
one bidirectional ``Session`` stream per session, Open -> Opened, Step -> Token per token, Close.

Any server of that service is a target: ``splitkernels serve`` (the same port as the struct
protocol) or the Ray Serve gRPC proxy in front of N replicas (``splitkernels cluster``,
:mod:`.ray_serve`), where the stream pins the session to one replica for its life. ``metadata``
travels with every call (Ray Serve reads ``application`` from it). The service carries single
steps only: a speculative (multi-token) step is refused with FAILED_PRECONDITION.
"""
from __future__ import annotations

import json

import grpc

from .grpc_transport import AUTH_KEY, DEFAULT_MAX_MESSAGE_BYTES, StreamSession, _status_of
from .proto import split_pb2, split_pb2_grpc
from .protocol import Open, SplitError, Status, TokenReply
from .transport import Exchange, Transport


def proto_open(request: Open) -> split_pb2.Open:
    """The ``.proto`` form of an OPEN (the fingerprint always sent: 16 bytes, zeros = unchecked)."""
    s = request.sampling
    sampling = split_pb2.Sampling(do_sample=s.do_sample, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    if s.seed is not None:
        sampling.seed = s.seed
    return split_pb2.Open(sampling=sampling, fingerprint=request.fingerprint, max_len=request.max_len)


class _ProtoSession(StreamSession):
    def __init__(self, transport: "ProtoTransport", request: Open) -> None:
        super().__init__(lambda requests: transport._stub.Session(requests, timeout=transport.timeout_s,
                                                                  metadata=transport.metadata))
        reply, _ = self._exchange(split_pb2.Request(open=proto_open(request)), "opened")
        self.session_id, self.max_seq_len = reply.opened.session_id, reply.opened.max_seq_len

    def _exchange(self, request: split_pb2.Request, kind: str) -> tuple[split_pb2.Reply, int]:
        """Send one request, wait for its reply of ``kind``; the reply and the request's size."""
        self._send(request)
        reply = self._next_reply()
        if reply.WhichOneof("kind") != kind:
            self._finish()
            raise SplitError(Status.INTERNAL, f"expected a {kind} reply, got {reply.WhichOneof('kind')}")
        return reply, request.ByteSize()

    def step(self, seq: int, frame: bytes) -> Exchange:
        with self._lock:
            reply, up = self._exchange(split_pb2.Request(step=split_pb2.Step(seq=seq, frame=bytes(frame))), "token")
        t = reply.token
        if t.seq != seq:
            raise SplitError(Status.INTERNAL, f"reply to step {t.seq}, expected {seq}")
        return Exchange(TokenReply(self.session_id, t.seq, t.token, t.position, t.decode_s, t.compute_s, t.kv_bytes),
                        up, reply.ByteSize())

    def _close_request(self) -> split_pb2.Request:
        return split_pb2.Request(close=split_pb2.Close())


class ProtoTransport(Transport):
    """Sessions on a server of the ``.proto`` service at ``target`` (``host:port``).

    ``token`` is sent as ``authorization: Bearer <token>``; ``metadata`` (pairs) goes with every
    call; ``timeout_s`` is each session's deadline (None = none). Plaintext only: put TLS in front
    (the Ray Serve proxy speaks plaintext, see docs/DESIGN.md).
    """

    def __init__(self, target: str, token: str | None = None, metadata: tuple[tuple[str, str], ...] = (),
                 timeout_s: float | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if not isinstance(target, str) or ":" not in target:
            raise ValueError(f"target must be 'host:port', got {target!r}")
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        self._channel = grpc.insecure_channel(target, options=options)
        self._stub = split_pb2_grpc.SplitStub(self._channel)
        self.target, self.timeout_s = target, timeout_s
        self.metadata = tuple(metadata) + (((AUTH_KEY, f"Bearer {token}"),) if token is not None else ())

    def open(self, request: Open) -> _ProtoSession:
        return _ProtoSession(self, request)

    def info(self, timeout_s: float = 10.0) -> dict:
        """The server's description, sessions and memory (the Info method's JSON; behind Ray
        Serve, of whichever replica answered)."""
        try:
            return json.loads(self._stub.Info(split_pb2.InfoRequest(), timeout=timeout_s, metadata=self.metadata).json)
        except grpc.RpcError as exc:
            raise _status_of(exc) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ProtoTransport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
