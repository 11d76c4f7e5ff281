"""gRPC between edge and server: one bidirectional stream per session carrying protocol messages
as raw bytes (generic handlers, no generated code, nothing pickled).

* ``/splitkernels.runtime.Split/Session`` (stream-stream): OPEN -> OPENED, then STEP -> TOKEN
  per token, then CLOSE. The session lives as long as its stream: a stream that ends, fails or
  is cancelled (a client that dies) frees the session and its KV cache.
* ``/splitkernels.runtime.Split/Info`` (unary): server description and memory as JSON.

Errors travel as gRPC status codes with a message: INVALID_ARGUMENT (bad message or frame),
NOT_FOUND (unknown session), CANCELLED (the idle timeout expired the session and its stream),
RESOURCE_EXHAUSTED (limits, oversized message),
UNAUTHENTICATED (token), FAILED_PRECONDITION (edge and server disagree on the model). A failed
request ends its own stream only; the server and other sessions go on.
"""
from __future__ import annotations

import hmac
import json
import queue
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc

from .metrics import process_rss_bytes
from .protocol import (
    Close, Open, Opened, SplitError, Status, Step, TokenReply, Verdict, Verify, decode_message, encode_message,
)
from .sessions import SessionManager
from .transport import Exchange, SessionHandle, Transport, expect

SERVICE = "splitkernels.runtime.Split"
SESSION_METHOD = f"/{SERVICE}/Session"
INFO_METHOD = f"/{SERVICE}/Info"
AUTH_KEY = "authorization"
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


@dataclass(frozen=True)
class TlsFiles:
    """PEM bytes for TLS: the server uses ``cert_chain`` + ``private_key``; a client trusts
    ``root_certificates`` (None = the system roots)."""

    cert_chain: bytes | None = None
    private_key: bytes | None = None
    root_certificates: bytes | None = None

    @classmethod
    def from_paths(cls, cert: str | None = None, key: str | None = None, ca: str | None = None) -> "TlsFiles":
        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        return cls(read(cert), read(key), read(ca))


def _keepalive_options(keepalive_s: float) -> list[tuple[str, int]]:
    ms = int(keepalive_s * 1000)
    return [("grpc.keepalive_time_ms", ms), ("grpc.keepalive_timeout_ms", max(ms // 3, 1000)),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]


def _status_of(error: grpc.RpcError) -> SplitError:
    code = error.code() if hasattr(error, "code") else None
    name = code.name if code is not None else "UNAVAILABLE"
    details = error.details() if hasattr(error, "details") else str(error)
    return SplitError(Status.__members__.get(name, Status.INTERNAL), details or name)


class GrpcServer:
    """Serves a :class:`SessionManager` over gRPC.

    ``port=0`` takes a free port (see :attr:`port` after :meth:`start`). ``token`` makes every
    call present ``authorization: Bearer <token>``. ``tls`` (cert chain + key) switches to TLS.
    ``max_message_bytes`` bounds a message either way; one stream (and worker thread) per session.
    """

    def __init__(self, manager: SessionManager, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 tls: TlsFiles | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 keepalive_s: float = 30.0, info: dict | None = None) -> None:
        if not isinstance(manager, SessionManager):
            raise TypeError(f"manager must be a SessionManager, got {type(manager).__name__}")
        if tls is not None and (tls.cert_chain is None or tls.private_key is None):
            raise ValueError("tls needs cert_chain and private_key on the server")
        if not isinstance(max_message_bytes, int) or max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be an int >= 1024, got {max_message_bytes!r}")
        self.manager, self.host, self.token, self.tls = manager, host, token, tls
        self.max_message_bytes = max_message_bytes
        self.info_extra = dict(info or {})
        workers = manager.limits.max_sessions + 4
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.http2.min_ping_interval_without_data_ms", 1000),
                   *_keepalive_options(keepalive_s)]
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="splitkernels"),
                                   options=options, maximum_concurrent_rpcs=workers)
        handlers = {
            "Session": grpc.stream_stream_rpc_method_handler(self._session),
            "Info": grpc.unary_unary_rpc_method_handler(self._info),
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        address = f"{host}:{port}"
        if tls is None:
            self.port = self._server.add_insecure_port(address)
        else:
            creds = grpc.ssl_server_credentials([(tls.private_key, tls.cert_chain)])
            self.port = self._server.add_secure_port(address, creds)
        if self.port == 0:
            raise OSError(f"could not bind {address}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "GrpcServer":
        self.manager.start_reaper()
        self._server.start()
        return self

    def stop(self, grace_s: float | None = 1.0) -> None:
        """Stop serving (in-flight calls get ``grace_s``) and free every session."""
        self._server.stop(grace_s).wait()
        self.manager.shutdown()

    def wait(self) -> None:
        self._server.wait_for_termination()

    def __enter__(self) -> "GrpcServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _authenticate(self, context: grpc.ServicerContext) -> None:
        if self.token is None:
            return
        presented = dict(context.invocation_metadata()).get(AUTH_KEY, "")
        if not hmac.compare_digest(str(presented).encode(), f"Bearer {self.token}".encode()):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

    def _info(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._authenticate(context)
        body = {**self.info_extra, "fingerprint": self.manager.fingerprint.hex(), "rss_bytes": process_rss_bytes(),
                **self.manager.stats()}
        return json.dumps(body).encode()

    def _session(self, requests, context: grpc.ServicerContext):
        self._authenticate(context)
        owned: list[int] = []  # the stream's session, freed however the stream ends

        def release() -> None:
            while owned:
                self.manager.close(owned.pop())

        context.add_callback(release)
        try:
            for data in requests:
                try:
                    msg = decode_message(data)
                    if isinstance(msg, Open):
                        if owned:
                            raise SplitError(Status.FAILED_PRECONDITION, "this stream already has a session")
                        opened = self.manager.open(msg, on_expire=context.cancel)
                        owned.append(opened.session_id)
                        yield encode_message(opened)
                    elif isinstance(msg, (Step, Verify)):
                        if not owned or msg.session_id != owned[0]:
                            raise SplitError(Status.NOT_FOUND,
                                             f"session {msg.session_id:#x} is not open on this stream")
                        run = self.manager.step if isinstance(msg, Step) else self.manager.verify
                        yield encode_message(run(msg))
                    elif isinstance(msg, Close):
                        return
                    else:
                        raise SplitError(Status.INVALID_ARGUMENT, f"{type(msg).__name__} is not a request")
                except SplitError as exc:
                    release()
                    context.abort(getattr(grpc.StatusCode, exc.status.value), exc.message)
        finally:
            release()


class _GrpcSession(SessionHandle):
    def __init__(self, transport: "GrpcTransport", request: Open) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()

        def requests():
            while (item := self._requests.get()) is not None:
                yield item

        self._call = transport._session_call(requests(), timeout=transport.timeout_s,
                                             metadata=transport._metadata)
        opened = self._exchange(encode_message(request), Opened)[0]
        self.session_id, self.max_seq_len = opened.session_id, opened.max_seq_len

    def _exchange(self, data: bytes, kind: type, session_id: int | None = None):
        if self._closed:
            raise SplitError(Status.FAILED_PRECONDITION, "session is closed")
        self._requests.put(data)
        try:
            reply = next(self._call)
        except grpc.RpcError as exc:
            self._finish()
            raise _status_of(exc) from None
        except StopIteration:
            self._finish()
            raise SplitError(Status.UNAVAILABLE, "server ended the session stream") from None
        return expect(reply, kind, session_id), reply

    def step(self, seq: int, frame: bytes) -> Exchange:
        request = encode_message(Step(self.session_id, seq, frame))
        with self._lock:
            msg, reply = self._exchange(request, TokenReply, self.session_id)
        return Exchange(msg, len(request), len(reply))

    def verify(self, seq: int, drafts: tuple[int, ...], frame: bytes) -> Exchange:
        request = encode_message(Verify(self.session_id, seq, tuple(drafts), frame))
        with self._lock:
            msg, reply = self._exchange(request, Verdict, self.session_id)
        return Exchange(msg, len(request), len(reply))

    def _finish(self) -> None:
        self._closed = True
        self._requests.put(None)

    def close(self) -> None:
        if self._closed:
            return
        self._requests.put(encode_message(Close(self.session_id)))
        self._finish()
        try:
            for _ in self._call:
                pass
        except grpc.RpcError:
            pass  # the session is gone either way

    def cancel(self) -> None:
        """Drop the stream without a goodbye (the server frees the session)."""
        self._finish()
        self._call.cancel()


class GrpcTransport(Transport):
    """Client side: sessions on a :class:`GrpcServer` at ``target`` (``host:port``).

    ``timeout_s`` is each session's deadline (DEADLINE_EXCEEDED past it; None = none).
    ``tls=True`` or a :class:`TlsFiles` (its ``root_certificates`` trusted) selects TLS;
    ``server_name`` overrides the name checked against the server certificate.
    """

    def __init__(self, target: str, token: str | None = None, tls: TlsFiles | bool | None = None,
                 timeout_s: float | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 keepalive_s: float = 30.0, server_name: str | None = None) -> None:
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes), *_keepalive_options(keepalive_s)]
        if server_name is not None:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls:
            roots = tls.root_certificates if isinstance(tls, TlsFiles) else None
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(roots), options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self.target, self.timeout_s = target, timeout_s
        self._metadata = ((AUTH_KEY, f"Bearer {token}"),) if token is not None else ()
        self._session_call = self._channel.stream_stream(SESSION_METHOD)
        self._info_call = self._channel.unary_unary(INFO_METHOD)

    def open(self, request: Open) -> _GrpcSession:
        return _GrpcSession(self, request)

    def info(self, timeout_s: float = 10.0) -> dict:
        """The server's description, sessions and memory (JSON from the Info method)."""
        try:
            return json.loads(self._info_call(b"", timeout=timeout_s, metadata=self._metadata))
        except grpc.RpcError as exc:
            raise _status_of(exc) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "GrpcTransport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
