"""``splitkernels serve``: the server half (layers l+1..L + head) behind gRPC, until SIGINT or
SIGTERM, either of which drains: no new sessions, and sessions in flight get ``--drain`` seconds."""
from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
import threading
from dataclasses import dataclass

from . import args as types
from .common import add_connection_args, message_bytes
from .errors import ConnectionFailure, UsageError
from .files import read_bytes
from .models import add_model_args, load_model, split_settings
from ..runtime.serve_metrics import ServerMetrics
from ..runtime.serve_options import add_serving_args
from ..runtime.sessions import SessionManager

DEFAULT_MAX_SEQ_LEN = 2048


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to anything


def _check_exposure(args: argparse.Namespace) -> None:
    """A server reachable from other machines must ask for a token, unless told otherwise."""
    if is_loopback(args.host):
        return
    if args.token is None and not args.insecure:
        raise UsageError(f"--host {args.host} is not a loopback address: give --token (or set SPLITKERNELS_TOKEN), "
                         f"or --insecure to let anyone who reaches it use the server")
    if args.tls_cert is None:
        print(f"warning: serving on {args.host} without TLS: the token and the activations cross the network in "
              f"the clear (give --tls-cert/--tls-key)", file=sys.stderr)


@dataclass
class ServerHalf:
    """What ``serve`` (and each ``cluster`` replica) serves: the session manager over the server
    layers, its metrics, and the description the Info method returns."""

    manager: SessionManager
    metrics: ServerMetrics
    info: dict
    banner: str  # "<model>, layers a..b + head"
    note: str | None


def load_server_half(args: argparse.Namespace) -> ServerHalf:
    """Load ``--model``, keep the layers after the split and build the manager the flags ask for
    (limits, batching, logs); flag errors are :class:`UsageError`."""
    from ..runtime.serve_options import build_manager
    from ..runtime.sessions import Limits
    from ..runtime.split_model import split_model

    loaded = load_model(args.model, args.family, args.seed)
    settings = split_settings(args, loaded)
    max_seq_len = args.max_seq_len or settings.max_seq_len or DEFAULT_MAX_SEQ_LEN
    sm = split_model(settings.prepare(loaded.model), settings.split_config("server"),
                     limits=Limits(args.max_sessions, max_seq_len, args.idle_timeout), fast=not args.eager,
                     side="server")
    try:
        manager, metrics = build_manager(sm.manager, args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    info = {"model": loaded.name, "split_layer": sm.split_layer, "hidden_size": sm.adapter.hidden_size}
    return ServerHalf(manager, metrics, info,
                      f"{loaded.name}, layers {sm.split_layer + 1}..{sm.adapter.num_layers} + head", loaded.note)


def _cmd_serve(args: argparse.Namespace) -> int:
    from ..runtime.grpc_transport import GrpcServer, TlsFiles

    _check_exposure(args)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    tls = TlsFiles(read_bytes(args.tls_cert, "certificate (--tls-cert)"),
                   read_bytes(args.tls_key, "private key (--tls-key)")) if args.tls_cert else None
    half = load_server_half(args)
    manager, metrics = half.manager, half.metrics
    try:
        server = GrpcServer(manager, args.host, args.port, token=args.token, tls=tls,
                            max_message_bytes=message_bytes(args), open_timeout_s=args.open_timeout,
                            max_sessions_per_client=args.max_sessions_per_client, info=half.info)
    except OSError as exc:
        raise ConnectionFailure(str(exc)) from None
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum, frame) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    server.start()
    print(f"serving {half.banner}, on {server.address} ({'TLS' if tls else 'plaintext'}, "
          f"{'token' if args.token else 'no'} auth, max_seq_len {manager.max_seq_len})", flush=True)
    if half.note:
        print(f"note: {half.note}", flush=True)
    if args.metrics_port is not None:
        http, _ = metrics.serve(args.metrics_port, args.host)
        print(f"metrics on http://{args.host}:{http.server_port}/metrics", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        sessions = manager.num_sessions
        print(f"{received[0] if received else 'stop'}: draining {sessions} session(s) for up to {args.drain:g} s",
              flush=True)
        server.stop(args.drain)
        print("stopped", flush=True)
    return 0


def add_server_half_args(p: argparse.ArgumentParser) -> None:
    """The flags :func:`load_server_half` reads, shared by ``serve`` and ``cluster``: model, server
    weights, session limits, batching and logs."""
    add_model_args(p)
    p.add_argument("--back-bits", type=int, choices=(2, 3, 4, 8), default=None,
                   help="OPSC: server layers' weight bits (8), default dense")
    p.add_argument("--max-sessions", type=types.positive_int, default=64)
    p.add_argument("--eager", action="store_true",
                   help="run every step through the model's own forward (default: the native decode path "
                        "where it covers the model)")
    p.add_argument("--max-seq-len", type=types.positive_int, default=None,
                   help=f"tokens per session (default: the plan's, else {DEFAULT_MAX_SEQ_LEN})")
    p.add_argument("--idle-timeout", type=types.positive, default=300.0,
                   help="seconds before an idle session is freed")
    add_serving_args(p)


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the server half (layers l+1..L + head) behind gRPC",
                              description=__doc__)
    add_server_half_args(p)
    add_connection_args(p, server=True)
    p.add_argument("--max-sessions-per-client", type=types.positive_int, default=None,
                   help="sessions one client address may hold (default: --max-sessions)")
    p.add_argument("--open-timeout", type=types.positive, default=10.0,
                   help="seconds a new stream may take to open its session")
    p.add_argument("--drain", type=types.non_negative, default=10.0,
                   help="on SIGINT/SIGTERM, seconds sessions in flight get to finish")
    p.set_defaults(func=_cmd_serve)
