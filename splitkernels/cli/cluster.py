"""``splitkernels cluster``: N replicas of the server half behind one gRPC address on Ray Serve
(``pip install ".[cluster]"``), until SIGINT or SIGTERM. Each session is one stream, pinned to the
replica that opened it (splitkernels/runtime/ray_serve.py). Without ``--ray-address`` a Ray
cluster is started on this machine for the command's lifetime; with it, the replicas join that
cluster (every node needs this package installed)."""
from __future__ import annotations

import argparse
import functools
import os
import signal
import threading

from . import args as types
from .common import TOKEN_ENV
from .errors import ConnectionFailure, UsageError
from .serve import add_server_half_args, load_server_half


def build_replica(args: argparse.Namespace):
    """Run in each replica: the manager ``splitkernels serve`` would serve with these flags, and
    its Info description."""
    half = load_server_half(args)
    return half.manager, half.info


def _config(args: argparse.Namespace):
    from ..runtime.ray_serve import ClusterConfig

    if args.metrics_port is not None:
        raise UsageError("--metrics-port is not available with cluster: Ray Serve exports the replicas' request "
                         "metrics itself")
    if args.token is None and not args.insecure:
        raise UsageError(f"Ray Serve's gRPC proxy listens on every interface of the machine without TLS: give --token "
                         f"(or set {TOKEN_ENV}), or --insecure to let anyone who reaches port {args.port} use it")
    try:
        return ClusterConfig(args.replicas, args.port, args.http_port, args.app_name, args.max_sessions,
                             args.max_waiting, args.replica_cpus, args.token, args.open_timeout)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _cmd_cluster(args: argparse.Namespace) -> int:
    from ..runtime import ray_serve

    config = _config(args)
    if not ray_serve.ray_serve_available():
        raise UsageError(f"cluster needs Ray Serve: {ray_serve.CLUSTER_INSTALL}")
    import ray

    if args.ray_address is None:
        ray_serve.start_local_ray(args.num_cpus or config.replicas * config.replica_cpus)
    else:
        try:
            ray.init(address=args.ray_address, configure_logging=False, log_to_driver=False)
        except (ConnectionError, RuntimeError) as exc:
            raise ConnectionFailure(f"--ray-address {args.ray_address}: {exc}") from None
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum, frame) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    try:
        try:
            address, info = ray_serve.deploy(functools.partial(build_replica, args), config)
        except OSError as exc:
            raise ConnectionFailure(str(exc)) from None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        print(f"serving {config.replicas} replica(s) of {info['model']} (the layers after {info['split_layer']}) on "
              f"{address} (Ray Serve gRPC proxy, application {config.app_name!r}, plaintext, "
              f"{'token' if args.token else 'no'} auth, {config.max_sessions} sessions per replica)", flush=True)
        while not stop.wait(1.0):
            pass
        print(f"{received[0] if received else 'stop'}: shutting the replicas down", flush=True)
    finally:
        ray_serve.shutdown()
    print("stopped", flush=True)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("cluster", help="N server replicas behind one gRPC address (Ray Serve)",
                              description=__doc__)
    add_server_half_args(p)
    g = p.add_argument_group("cluster")
    g.add_argument("--replicas", type=types.positive_int, default=2, help="server replicas (each loads the model)")
    g.add_argument("--port", type=types.integer(1, 65535), default=9000, help="gRPC port of the one address")
    g.add_argument("--http-port", type=types.integer(1, 65535), default=8000,
                   help="Ray Serve's HTTP proxy port (unused by edges, on loopback)")
    g.add_argument("--app-name", default="splitkernels", help="Ray Serve application name (gRPC metadata "
                   "'application' of the edges)")
    g.add_argument("--max-waiting", type=types.positive_int, default=16,
                   help="new sessions that may wait for a free slot when every replica is full")
    g.add_argument("--replica-cpus", type=types.positive, default=1.0, help="CPUs (and torch threads) per replica")
    g.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start one on this machine)")
    g.add_argument("--num-cpus", type=types.positive, default=None,
                   help="CPUs of the local Ray cluster (default: replicas x replica CPUs)")
    g.add_argument("--open-timeout", type=types.positive, default=10.0,
                   help="seconds a new stream may take to open its session")
    g.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"shared token (default ${TOKEN_ENV})")
    g.add_argument("--insecure", action="store_true", help="serve without a token")
    p.set_defaults(func=_cmd_cluster)
