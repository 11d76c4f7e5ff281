"""Command-line options of a serving process for batching, metrics and logs, and the manager they
build (kept apart from the CLI module so any front end can reuse them)."""
from __future__ import annotations

import argparse
import logging
import sys

from .batching import BatchConfig, BatchingSessionManager
from .serve_metrics import ServerMetrics
from .sessions import SessionManager

_DEFAULT = BatchConfig()


def add_serving_args(p: argparse.ArgumentParser) -> None:
    """``--batching``, the scheduler's limits, ``--metrics-port`` and ``--log-json``."""
    g = p.add_argument_group("batching and operations")
    g.add_argument("--batching", choices=("on", "off"), default="on",
                   help="continuous batching of decode steps across sessions (bench/serve_load.py)")
    g.add_argument("--batch-window-ms", type=float, default=_DEFAULT.window_s * 1000,
                   help="wait at most this long for the stepping sessions' steps before a batch")
    g.add_argument("--batch-window-fraction", type=float, default=_DEFAULT.window_fraction,
                   help="the wait may stretch to this fraction of the last batch's time")
    g.add_argument("--max-batch", type=int, default=_DEFAULT.max_batch, help="decode steps per forward")
    g.add_argument("--prefill-chunk", type=int, default=_DEFAULT.prefill_chunk,
                   help="prefill tokens run between two decode batches")
    g.add_argument("--max-tokens-in-flight", type=int, default=_DEFAULT.max_tokens_in_flight,
                   help="tokens queued over all sessions; past it a step is refused (RESOURCE_EXHAUSTED)")
    g.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port of --host (0 = a free port)")
    g.add_argument("--log-json", action="store_true", help="session events as JSON lines on stderr")


def build_manager(base: SessionManager, args: argparse.Namespace) -> tuple[SessionManager, ServerMetrics]:
    """The manager to serve (``base`` or a batching one over the same segment and limits), with
    metrics attached; raises ValueError naming the bad option."""
    manager = base
    if args.batching == "on":
        try:
            config = BatchConfig(args.batch_window_ms / 1000, args.max_batch, args.prefill_chunk,
                                 args.max_tokens_in_flight, args.batch_window_fraction)
        except ValueError as exc:
            raise ValueError(f"batching options: {exc}") from None
        manager = BatchingSessionManager(base.server, base.limits, base.fingerprint, config)
    if args.log_json:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log = logging.getLogger("splitkernels.serve")
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    return manager, ServerMetrics(manager)
