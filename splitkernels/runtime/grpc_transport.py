"""gRPC between edge and server: one bidirectional stream per session carrying protocol messages
as raw bytes (generic handlers, no generated code, nothing pickled).

* ``/splitkernels.runtime.Split/Session`` (stream-stream): OPEN -> OPENED, then STEP -> TOKEN
  per token, then CLOSE. The session lives as long as its stream: a stream that ends, fails or
  is cancelled (a client that dies) frees the session and its KV cache.
* ``/splitkernels.runtime.Split/Info`` (unary): server description and memory as JSON.

Errors travel as gRPC status codes with a message: INVALID_ARGUMENT (bad message or frame),
NOT_FOUND (unknown session), CANCELLED (the idle timeout expired the session and its stream),
DEADLINE_EXCEEDED (a new stream sent no OPEN in time), RESOURCE_EXHAUSTED (limits, oversized
message, too many streams without a session), UNAUTHENTICATED (token), FAILED_PRECONDITION (edge
and server disagree on the model). A failed request ends its own stream only; the server and
other sessions go on.

Admission: a stream must send OPEN within ``open_timeout_s``; streams still waiting for theirs
are capped in all and per client (a new one past a cap evicts the oldest waiting one), and the
worker pool keeps threads beyond every session and waiting stream for Info, so neither idle
sessions nor unopened streams lock other clients out.
"""
from __future__ import annotations

import hmac
import json
import queue
import threading
import time
from collections import OrderedDict
from concurrent import futures
from dataclasses import dataclass
from typing import Callable

import grpc

from .metrics import process_rss_bytes
from .proto_service import add_services
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
# Worker threads beyond sessions and waiting streams, so Info (and refusals) always get one.
INFO_WORKERS = 2
# Messages a stream's reader takes ahead of its handler (flow control does the rest).
_READ_AHEAD = 8
_END, _EVICTED, _EXPIRED = object(), object(), object()


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


def client_of(peer: str) -> str:
    """The client part of a gRPC peer string (``ipv4:1.2.3.4:5678`` -> ``ipv4:1.2.3.4``)."""
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


class _Waiting:
    """Streams that have not sent OPEN yet, oldest first, capped in all and per client: admitting
    one past a cap evicts the oldest stream that has waited at least ``grace_s`` (of the same
    client when that client is over its own cap), so a flood of unopened streams displaces itself
    while a burst of honest streams, each opening within milliseconds, is left alone."""

    def __init__(self, max_total: int, max_per_client: int, grace_s: float) -> None:
        self.max_total, self.max_per_client, self.grace_s = max_total, max_per_client, grace_s
        self._streams: OrderedDict[int, tuple[str, Callable[[], None], float]] = OrderedDict()
        self._lock = threading.Lock()
        self._next = 0
        self.evicted = 0

    def _evict(self, client: str | None, count: int, now: float) -> list[Callable[[], None]]:
        old = [k for k, (c, _, t) in self._streams.items()
               if now - t >= self.grace_s and (client is None or c == client)]
        return [self._streams.pop(k)[1] for k in old[:max(count, 0)]]

    def admit(self, client: str, evict: Callable[[], None]) -> int:
        now = time.monotonic()
        with self._lock:
            mine = sum(1 for c, _, _ in self._streams.values() if c == client)
            victims = self._evict(client, mine + 1 - self.max_per_client, now)
            victims += self._evict(None, len(self._streams) + 1 - self.max_total, now)
            self._next += 1
            self._streams[self._next] = (client, evict, now)
            self.evicted += len(victims)
        for victim in victims:
            victim()
        return self._next

    def done(self, ticket: int) -> None:
        with self._lock:
            self._streams.pop(ticket, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)


class GrpcServer:
    """Serves a :class:`SessionManager` over gRPC.

    ``port=0`` takes a free port (see :attr:`port` after :meth:`start`); a port another process
    holds is an error (no port sharing). ``token`` makes every call present ``authorization:
    Bearer <token>``. ``tls`` (cert chain + key) switches to TLS. ``max_message_bytes`` bounds a
    message either way. A new stream must send OPEN within ``open_timeout_s``; at most
    ``max_waiting`` streams (default: the manager's session limit) wait for theirs, at most
    ``max_waiting_per_client`` (default half that) per client address, and a client holds at
    most ``max_sessions_per_client`` sessions (default: the manager's limit). The worker pool
    has a thread for every session and waiting stream plus ``INFO_WORKERS`` for Info.
    """

    def __init__(self, manager: SessionManager, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 tls: TlsFiles | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 keepalive_s: float = 30.0, info: dict | None = None, open_timeout_s: float = 10.0,
                 max_waiting: int | None = None, max_waiting_per_client: int | None = None,
                 max_sessions_per_client: int | None = None) -> None:
        if not isinstance(manager, SessionManager):
            raise TypeError(f"manager must be a SessionManager, got {type(manager).__name__}")
        if tls is not None and (tls.cert_chain is None or tls.private_key is None):
            raise ValueError("tls needs cert_chain and private_key on the server")
        if not isinstance(max_message_bytes, int) or max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be an int >= 1024, got {max_message_bytes!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int in [0, 65535], got {port!r}")
        if not open_timeout_s > 0:
            raise ValueError(f"open_timeout_s must be > 0, got {open_timeout_s!r}")
        sessions = manager.limits.max_sessions
        max_waiting = max_waiting or sessions
        max_waiting_per_client = max_waiting_per_client or max(1, max_waiting // 2)
        self.max_sessions_per_client = max_sessions_per_client or sessions
        for name, v in (("max_waiting", max_waiting), ("max_waiting_per_client", max_waiting_per_client),
                        ("max_sessions_per_client", self.max_sessions_per_client)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.manager, self.host, self.token, self.tls = manager, host, token, tls
        self.max_message_bytes, self.open_timeout_s = max_message_bytes, float(open_timeout_s)
        self.info_extra = dict(info or {})
        self._waiting = _Waiting(max_waiting, max_waiting_per_client, min(0.5, open_timeout_s / 2))
        self._client_sessions: dict[str, int] = {}
        self._clients_lock = threading.Lock()
        workers = sessions + max_waiting + INFO_WORKERS
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.http2.min_ping_interval_without_data_ms", 1000),
                   ("grpc.so_reuseport", 0),
                   *_keepalive_options(keepalive_s)]
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="splitkernels"),
                                   options=options, maximum_concurrent_rpcs=4 * workers)
        handlers = {
            "Session": grpc.stream_stream_rpc_method_handler(self._session),
            "Info": grpc.unary_unary_rpc_method_handler(self._info),
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        # The same sessions through the .proto service, plus gRPC health and reflection (proto_service.py).
        self.health = add_services(self._server, manager, self._authenticate, self._info_body, (SERVICE,))
        address = f"{host}:{port}"
        try:
            if tls is None:
                self.port = self._server.add_insecure_port(address)
            else:
                creds = grpc.ssl_server_credentials([(tls.private_key, tls.cert_chain)])
                self.port = self._server.add_secure_port(address, creds)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {address}: the port is in use or the address is not one of this "
                          f"machine's")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "GrpcServer":
        self.manager.start_reaper()
        self._server.start()
        return self

    def stop(self, grace_s: float | None = 1.0) -> None:
        """Stop serving: new calls are refused at once, calls in flight get ``grace_s`` seconds
        (a drain), then every session is freed."""
        self.health.enter_graceful_shutdown()
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

    def _info_body(self) -> dict:
        return {**self.info_extra, "fingerprint": self.manager.fingerprint.hex(), "rss_bytes": process_rss_bytes(),
                "waiting_streams": len(self._waiting), "evicted_streams": self._waiting.evicted,
                **self.manager.stats()}

    def _info(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._authenticate(context)
        return json.dumps(self._info_body()).encode()

    @staticmethod
    def _read(requests, inbox: queue.Queue, slots: threading.Semaphore, finished: threading.Event) -> None:
        """Move a stream's requests into ``inbox`` so its handler can wait with a deadline."""
        try:
            for data in requests:
                inbox.put(data)
                while not slots.acquire(timeout=0.5):
                    if finished.is_set():
                        return
        except Exception:  # the stream was cancelled or broke: the handler learns it from _END
            pass
        inbox.put(_END)

    def _claim(self, client: str) -> None:
        with self._clients_lock:
            held = self._client_sessions.get(client, 0)
            if held >= self.max_sessions_per_client:
                raise SplitError(Status.RESOURCE_EXHAUSTED,
                                 f"this client holds {held} sessions, the server's per-client limit")
            self._client_sessions[client] = held + 1

    def _unclaim(self, client: str) -> None:
        with self._clients_lock:
            held = self._client_sessions.get(client, 0) - 1
            if held > 0:
                self._client_sessions[client] = held
            else:
                self._client_sessions.pop(client, None)

    def _session(self, requests, context: grpc.ServicerContext):
        self._authenticate(context)
        client = client_of(context.peer())
        inbox: queue.Queue = queue.Queue()
        slots, finished = threading.Semaphore(_READ_AHEAD), threading.Event()
        owned: list[int] = []  # the stream's session, freed however the stream ends
        lock = threading.Lock()

        def release() -> None:
            with lock:
                while owned:
                    self.manager.close(owned.pop())
                    self._unclaim(client)

        def ended() -> None:
            finished.set()
            inbox.put(_END)
            release()

        ticket = self._waiting.admit(client, lambda: inbox.put(_EVICTED))
        context.add_callback(ended)
        threading.Thread(target=self._read, args=(requests, inbox, slots, finished), daemon=True,
                         name="splitkernels-reader").start()
        open_by = time.monotonic() + self.open_timeout_s
        try:
            while True:
                try:
                    item = inbox.get(timeout=None if owned else max(open_by - time.monotonic(), 0.0))
                except queue.Empty:
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"no OPEN within {self.open_timeout_s:g} s of the stream's start")
                if item is _END:
                    return
                if item is _EVICTED:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  "too many streams without a session: this one, the oldest, was dropped")
                if item is _EXPIRED:
                    context.abort(grpc.StatusCode.CANCELLED,
                                  f"session expired: no request for {self.manager.limits.idle_timeout_s:g} s (the "
                                  f"server's idle timeout), its KV cache was freed; open a new session")
                slots.release()
                try:
                    msg = decode_message(item)
                    if isinstance(msg, Open):
                        self._waiting.done(ticket)
                        if owned:
                            raise SplitError(Status.FAILED_PRECONDITION, "this stream already has a session")
                        self._claim(client)
                        try:
                            opened = self.manager.open(msg, on_expire=lambda: inbox.put(_EXPIRED))
                        except SplitError:
                            self._unclaim(client)
                            raise
                        with lock:
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
            finished.set()
            self._waiting.done(ticket)
            release()


class StreamSession(SessionHandle):
    """A client session on one bidirectional gRPC stream: requests go through a queue the call
    reads, replies are read in order. Subclasses say how to open, step and close in their wire
    encoding (the struct protocol here, the ``.proto`` messages in :mod:`.proto_client`)."""

    def __init__(self, start_call: Callable) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()

        def requests():
            while (item := self._requests.get()) is not None:
                yield item

        self._call = start_call(requests())

    def _send(self, request) -> None:
        if self._closed:
            raise SplitError(Status.FAILED_PRECONDITION, "session is closed")
        self._requests.put(request)

    def _next_reply(self):
        """The next reply off the stream; a broken or ended stream closes the session."""
        try:
            return next(self._call)
        except grpc.RpcError as exc:
            self._finish()
            raise _status_of(exc) from None
        except StopIteration:
            self._finish()
            raise SplitError(Status.UNAVAILABLE, "server ended the session stream") from None

    def _close_request(self):
        raise NotImplementedError

    def _finish(self) -> None:
        self._closed = True
        self._requests.put(None)

    def close(self) -> None:
        if self._closed:
            return
        self._requests.put(self._close_request())
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


class _GrpcSession(StreamSession):
    def __init__(self, transport: "GrpcTransport", request: Open) -> None:
        super().__init__(lambda requests: transport._session_call(requests, timeout=transport.timeout_s,
                                                                  metadata=transport._metadata))
        opened = self._exchange(encode_message(request), Opened)[0]
        self.session_id, self.max_seq_len = opened.session_id, opened.max_seq_len

    def _exchange(self, data: bytes, kind: type, session_id: int | None = None):
        self._send(data)
        return self._receive(kind, session_id)

    def step(self, seq: int, frame: bytes) -> Exchange:
        request = encode_message(Step(self.session_id, seq, frame))
        with self._lock:
            msg, reply = self._exchange(request, TokenReply, self.session_id)
        return Exchange(msg, len(request), len(reply))

    def replay(self, frames: list[bytes]) -> list[TokenReply]:
        """Pipelined: every step goes out before the first reply is awaited (one round trip)."""
        with self._lock:
            for seq, frame in enumerate(frames):
                self._send(encode_message(Step(self.session_id, seq, frame)))
            return [self._receive(TokenReply, self.session_id)[0] for _ in frames]

    def _receive(self, kind: type, session_id: int | None):
        """The next reply, parsed and checked, with its bytes."""
        reply = self._next_reply()
        return expect(reply, kind, session_id), reply

    def verify(self, seq: int, drafts: tuple[int, ...], frame: bytes) -> Exchange:
        request = encode_message(Verify(self.session_id, seq, tuple(drafts), frame))
        with self._lock:
            msg, reply = self._exchange(request, Verdict, self.session_id)
        return Exchange(msg, len(request), len(reply))

    def _close_request(self) -> bytes:
        return encode_message(Close(self.session_id))


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
                   ("grpc.max_send_message_length", max_message_bytes), *_keepalive_options(keepalive_s),
                   # Reconnect soon after a server restart (gRPC's default backoff grows to 2 minutes).
                   ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 2000)]
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
