"""Flags and helpers shared by the serve, edge and demo commands."""
from __future__ import annotations

import argparse
import os

from . import args as types

TOKEN_ENV = "SPLITKERNELS_TOKEN"


def add_connection_args(p: argparse.ArgumentParser, server: bool) -> None:
    g = p.add_argument_group("connection")
    if server:
        g.add_argument("--host", default="127.0.0.1",
                       help="address to listen on; a non-loopback one needs --token (or --insecure)")
        g.add_argument("--port", type=types.port, default=50051, help="TCP port, 0-65535 (0: any free port)")
        g.add_argument("--tls-cert", default=None, help="PEM certificate chain (enables TLS)")
        g.add_argument("--tls-key", default=None, help="PEM private key")
        g.add_argument("--insecure", action="store_true",
                       help="allow a non-loopback --host without a token (anyone who reaches it may use it)")
    else:
        g.add_argument("--server", default="127.0.0.1:50051", help="host:port of `splitkernels serve`")
        g.add_argument("--tls-ca", default=None, help="PEM root certificate to trust (enables TLS)")
        g.add_argument("--server-name", default=None, help="name to check in the server certificate")
        g.add_argument("--timeout", type=types.positive, default=600.0, help="deadline of the session, seconds")
    g.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"shared token (default ${TOKEN_ENV})")
    g.add_argument("--max-message-mb", type=types.number(0.01, 2047.0), default=64.0,
                   help="largest message either way, MiB")


def message_bytes(args: argparse.Namespace) -> int:
    return max(int(args.max_message_mb * 2**20), 1024)
