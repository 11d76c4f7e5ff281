"""N replicas of the server half behind one gRPC address, on Ray Serve (the optional extra
``pip install ".[cluster]"``; ``splitkernels cluster`` starts it with one command).

How it fits Ray Serve: Serve's gRPC proxy listens on one port and forwards each call of the
``.proto`` service (``splitkernels.runtime.v1.Split``, registered with the proxy by its generated
``add_SplitServicer_to_server``) to one replica of a deployment, bidirectional streams included
(the ``cluster`` extra asks for ray 2.60, the release this was built and tested with; older
releases forwarded unary and server-streaming calls only). A session is one ``Session`` stream
(Open, Step..., Close), so the proxy's choice of replica for the stream *is* the session's affinity: every step of a session reaches the
replica that holds its KV cache, without multiplexed model ids, session headers or a routing
table. Each replica is :class:`SplitReplica`: the same :class:`SessionManager` (batching or not)
that ``splitkernels serve`` runs, built in the replica by a picklable ``build`` callable.

Capacity: a replica's ``max_ongoing_requests`` is its session limit (one stream per session), so
Serve routes a new stream only to a replica with a free session slot (the less loaded of two, Ray's
power-of-two choice); when every replica is full, at most ``max_waiting`` new streams wait in the
proxy for a slot and any more are refused with RESOURCE_EXHAUSTED. Nothing evicts a live session:
a session ends only when its stream ends (Close, client gone, deadline), its idle timeout expires
(the stream is then ended with CANCELLED) or its replica dies (the stream fails; the edge may
reopen it elsewhere, see ``resume.py``). Serve's model multiplexing was not used
because its LRU cache unloads the least recently used id when a replica is full and its routing
is best effort (a busy replica's ids are routed elsewhere after a timeout).

Not carried over from ``splitkernels serve``: TLS (the proxy listens in plaintext on every
interface: use a token, keep the port inside a private network or put a TLS terminator in front),
the struct-protocol service and so speculative (multi-token) steps, per-client limits, and the
Prometheus port (each replica's manager still counts; Ray Serve exports its own request metrics).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import grpc

from .grpc_transport import AUTH_KEY
from .proto import split_pb2
from .proto_client import ProtoTransport
from .proto_service import open_request, opened_reply, token_reply
from .protocol import SplitError, Status, Step
from .sessions import SessionManager

CLUSTER_INSTALL = 'pip install ".[cluster]"  (Ray Serve, ray[serve] >= 2.60)'
SERVICER_FUNCTION = "splitkernels.runtime.proto.split_pb2_grpc.add_SplitServicer_to_server"
# gRPC metadata key Ray Serve's proxy reads to pick the application.
APPLICATION_KEY = "application"
DEPLOYMENT_NAME = "SplitServer"


def ray_serve_available() -> bool:
    """Whether Ray Serve with bidirectional gRPC streams (ray >= 2.60) can be imported."""
    try:
        from ray.serve.grpc_util import gRPCInputStream  # noqa: F401
    except ImportError:
        return False
    return True


def require_ray_serve() -> None:
    if not ray_serve_available():
        raise ImportError(f"Ray Serve with bidirectional gRPC streams is not installed: {CLUSTER_INSTALL}")


@dataclass(frozen=True)
class ClusterConfig:
    """How the server half is replicated.

    * ``replicas``: server replicas (each loads the model once).
    * ``port``: the gRPC port of Serve's proxy, the one address edges connect to.
    * ``http_port``: Serve's HTTP proxy (unused by the edge; Serve always starts it, on loopback).
    * ``max_sessions``: sessions per replica (its ``max_ongoing_requests``); ``build``'s manager
      should allow as many (fewer: the surplus streams are refused with RESOURCE_EXHAUSTED).
    * ``max_waiting``: new streams that may wait for a free session slot while every replica is
      full; past it RESOURCE_EXHAUSTED. Streams also wait while the proxy routes them, so it must
      cover the largest burst of simultaneous opens.
    * ``replica_cpus``: CPUs Ray reserves per replica, also its torch threads.
    * ``token``: required as ``authorization: Bearer <token>`` when set.
    * ``open_timeout_s``: a stream that sends no Open this long is ended (DEADLINE_EXCEEDED).
    """

    replicas: int = 2
    port: int = 9000
    http_port: int = 8000
    app_name: str = "splitkernels"
    max_sessions: int = 64
    max_waiting: int = 16
    replica_cpus: float = 1.0
    token: str | None = None
    open_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("replicas", "max_sessions", "max_waiting"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("port", "http_port"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
                raise ValueError(f"{name} must be an int in [1, 65535], got {v!r}")
        if self.port == self.http_port:
            raise ValueError(f"port and http_port must differ, both are {self.port}")
        if not self.app_name or not self.app_name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"app_name must be letters, digits, '-' or '_', got {self.app_name!r}")
        if not self.replica_cpus > 0:
            raise ValueError(f"replica_cpus must be > 0, got {self.replica_cpus!r}")
        if not self.open_timeout_s > 0:
            raise ValueError(f"open_timeout_s must be > 0, got {self.open_timeout_s!r}")


class _Refused(Exception):
    """A request the replica refuses; the status was set on the gRPC context already."""


def _refuse(grpc_context: Any, status: Status, message: str) -> _Refused:
    grpc_context.set_code(getattr(grpc.StatusCode, status.value))
    grpc_context.set_details(message)
    return _Refused(f"{status.value}: {message}")


class ReplicaSessions:
    """The ``.proto`` service of one replica over ``manager``, as Ray Serve calls it: ``Session``
    gets an async iterator of requests and yields replies, ``Info`` answers once; refusals set the
    status on ``grpc_context`` and raise. Ray-free, so it is tested without a cluster.

    Steps run on a thread pool with a thread per session, so a batching manager sees the steps of
    different sessions at once and the event loop keeps reading other streams.
    """

    def __init__(self, manager: SessionManager, info: dict, token: str | None = None,
                 open_timeout_s: float = 10.0) -> None:
        self.manager, self.token, self.open_timeout_s = manager, token, open_timeout_s
        self.info = {**info, "fingerprint": manager.fingerprint.hex()}
        self._pool = ThreadPoolExecutor(manager.limits.max_sessions + 1, thread_name_prefix="splitkernels")

    def _authenticate(self, grpc_context: Any) -> None:
        if self.token is None:
            return
        presented = dict(grpc_context.invocation_metadata()).get(AUTH_KEY, "")
        if not hmac.compare_digest(str(presented).encode(), f"Bearer {self.token}".encode()):
            raise _refuse(grpc_context, Status.UNAUTHENTICATED, "missing or wrong token")

    async def Info(self, request: split_pb2.InfoRequest, grpc_context: Any = None) -> split_pb2.InfoReply:
        self._authenticate(grpc_context)
        return split_pb2.InfoReply(json=json.dumps({**self.info, **self.manager.stats()}))

    async def _next(self, requests, expired: asyncio.Event, opened: bool):
        """The stream's next request (None when it ended); SplitError when the session expired or no
        Open came in time."""
        nxt = asyncio.ensure_future(requests.__anext__())
        expiry = asyncio.ensure_future(expired.wait())
        try:
            done, _ = await asyncio.wait({nxt, expiry}, timeout=None if opened else self.open_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            expiry.cancel()
        if nxt in done:
            try:
                return nxt.result()
            except StopAsyncIteration:
                return None
        nxt.cancel()
        if not opened:
            raise SplitError(Status.DEADLINE_EXCEEDED,
                             f"no Open within {self.open_timeout_s:g} s of the stream's start")
        raise SplitError(Status.CANCELLED,
                         f"session expired: no request for {self.manager.limits.idle_timeout_s:g} s (the server's "
                         f"idle timeout), its KV cache was freed; open a new session")

    async def Session(self, requests, grpc_context: Any = None):
        """Open -> Opened, Step -> Token per token, Close; the session lives as long as the stream."""
        self._authenticate(grpc_context)
        loop = asyncio.get_running_loop()
        expired = asyncio.Event()
        session: int | None = None
        try:
            while (request := await self._next(requests, expired, session is not None)) is not None:
                kind = request.WhichOneof("kind")
                if kind == "open":
                    if session is not None:
                        raise SplitError(Status.FAILED_PRECONDITION, "this stream already has a session")
                    opened = self.manager.open(open_request(request.open),
                                               on_expire=lambda: loop.call_soon_threadsafe(expired.set))
                    session = opened.session_id
                    yield opened_reply(opened)
                elif kind == "step":
                    if session is None:
                        raise SplitError(Status.FAILED_PRECONDITION, "Step before Open on this stream")
                    step = Step(session, request.step.seq, request.step.frame)
                    yield token_reply(await loop.run_in_executor(self._pool, self.manager.step, step))
                elif kind == "close":
                    return
                else:
                    raise SplitError(Status.INVALID_ARGUMENT, "Request carries none of open, step, close")
        except SplitError as exc:
            raise _refuse(grpc_context, exc.status, exc.message) from None
        finally:
            if session is not None:
                # On the pool: a step still running (a cancelled stream) holds the session's lock.
                await asyncio.shield(loop.run_in_executor(self._pool, self.manager.close, session))

    def shutdown(self) -> None:
        """Free every session and stop the pool."""
        self.manager.shutdown()
        self._pool.shutdown(wait=False)


class SplitReplica(ReplicaSessions):
    """One Ray Serve replica: ``build()`` -> (SessionManager, info dict), run in the replica (so
    the model loads there), served by :class:`ReplicaSessions` with the replica's id in Info."""

    def __init__(self, build: Callable[[], tuple[SessionManager, dict]], token: str | None = None,
                 open_timeout_s: float = 10.0, threads: int = 1) -> None:
        import torch
        from ray import serve

        torch.set_num_threads(max(1, threads))
        manager, info = build()
        manager.start_reaper()
        replica = serve.get_replica_context().replica_id.unique_id
        super().__init__(manager, {**info, "replica": replica, "pid": os.getpid()}, token, open_timeout_s)

    def __del__(self) -> None:  # Serve calls it when it stops the replica
        if hasattr(self, "manager"):
            self.shutdown()


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def start_local_ray(num_cpus: float, object_store_mb: int = 128) -> None:
    """Start a Ray cluster on this machine (a head node) for this process, small: ``num_cpus``
    CPUs for replicas, an object store of ``object_store_mb`` MiB (requests and replies are a few
    KiB), no dashboard."""
    require_ray_serve()
    import ray

    ray.init(num_cpus=num_cpus, object_store_memory=object_store_mb << 20, include_dashboard=False,
             configure_logging=False, log_to_driver=False)


def deploy(build: Callable[[], tuple[SessionManager, dict]], config: ClusterConfig, ready_timeout_s: float = 300.0,
           address_host: str = "127.0.0.1") -> tuple[str, dict]:
    """Start Serve's gRPC proxy on ``config.port`` in the connected Ray cluster, run
    ``config.replicas`` :class:`SplitReplica` replicas built by ``build`` and wait until the
    address answers; returns ``host:port`` and the Info of the replica that answered first. The
    caller has called ``ray.init`` (or :func:`start_local_ray`); :func:`shutdown` stops it all."""
    require_ray_serve()
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    for name, port in (("port", config.port), ("http_port", config.http_port)):
        if not _port_is_free(port):
            raise OSError(f"{name} {port} is in use on this machine")
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=config.http_port),
                grpc_options=gRPCOptions(port=config.port, grpc_servicer_functions=[SERVICER_FUNCTION]))
    deployment = serve.deployment(SplitReplica, name=DEPLOYMENT_NAME, num_replicas=config.replicas,
                                  max_ongoing_requests=config.max_sessions, max_queued_requests=config.max_waiting,
                                  ray_actor_options={"num_cpus": config.replica_cpus})
    app = deployment.bind(build, config.token, config.open_timeout_s, max(1, int(config.replica_cpus)))
    serve.run(app, name=config.app_name, route_prefix=f"/{config.app_name}")
    address = f"{address_host}:{config.port}"
    return address, wait_ready(address, config.app_name, config.token, ready_timeout_s)


def wait_ready(address: str, app_name: str, token: str | None = None, timeout_s: float = 300.0) -> dict:
    """Poll Info through the proxy until a replica answers (the proxy learns of a new application a
    moment after Serve reports it running); that replica's Info."""
    deadline = time.monotonic() + timeout_s
    with transport(address, app_name, token) as client:
        while True:
            try:
                return client.info(timeout_s=5.0)
            except SplitError as exc:
                if exc.status in (Status.UNAUTHENTICATED, Status.INVALID_ARGUMENT) or time.monotonic() > deadline:
                    raise
            time.sleep(0.2)


def transport(address: str, app_name: str = ClusterConfig.app_name, token: str | None = None,
              timeout_s: float | None = None) -> ProtoTransport:
    """The edge's transport to a cluster at ``address`` (the proxy's ``host:port``)."""
    return ProtoTransport(address, token=token, metadata=((APPLICATION_KEY, app_name),), timeout_s=timeout_s)


def shutdown() -> None:
    """Stop Serve's applications and proxy, then this process's Ray connection (and the local
    cluster it started)."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


__all__ = ["CLUSTER_INSTALL", "ClusterConfig", "ReplicaSessions", "SplitReplica", "deploy", "ray_serve_available",
           "shutdown", "start_local_ray", "transport", "wait_ready"]
