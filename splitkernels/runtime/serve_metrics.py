"""Prometheus metrics and structured (one JSON object per line) logs for a serving
:class:`SessionManager`.

:class:`ServerMetrics` is the manager's ``observer``: it counts steps, frame bytes in and reply bytes
out, observes step latency, and (with batching) batch size and queue time; the open sessions and
the KV cache bytes are read from the manager when scraped. Each server gets its own registry, so
several servers in one process (tests) do not mix their numbers.

Metric names (all prefixed ``splitkernels_``): ``sessions``, ``kv_cache_bytes``,
``sessions_opened_total``, ``sessions_expired_total``, ``steps_total{kind=prefill|decode}``,
``step_seconds`` (histogram), ``batch_size`` (histogram), ``queue_seconds`` (histogram),
``received_bytes_total`` (codec frames), ``sent_bytes_total`` (token replies). Steps/s is
``rate(splitkernels_steps_total[1m])``.
"""
from __future__ import annotations

import json
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from .protocol import TokenReply, encode_message
from .sessions import SessionManager

LOG = logging.getLogger("splitkernels.serve")
REPLY_BYTES = len(encode_message(TokenReply(0, 0, 0, 0, 0.0, 0.0, 0)))  # fixed size
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """Metrics of one manager; attach with ``ServerMetrics(manager)`` (sets ``manager.observer``)."""

    def __init__(self, manager: SessionManager, registry: CollectorRegistry | None = None) -> None:
        if not isinstance(manager, SessionManager):
            raise TypeError(f"manager must be a SessionManager, got {type(manager).__name__}")
        self.registry = registry or CollectorRegistry()
        r = self.registry
        Gauge("splitkernels_sessions", "Open sessions", registry=r).set_function(lambda: manager.num_sessions)
        Gauge("splitkernels_kv_cache_bytes", "KV cache bytes over all sessions",
              registry=r).set_function(manager.kv_bytes_total)
        self.opened = Counter("splitkernels_sessions_opened", "Sessions opened", registry=r)
        self.expired = Counter("splitkernels_sessions_expired", "Sessions closed by the idle timeout", registry=r)
        self.steps = Counter("splitkernels_steps", "Steps served", ["kind"], registry=r)
        self.step_seconds = Histogram("splitkernels_step_seconds", "Server time per step (decode, queue, compute)",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("splitkernels_batch_size", "Steps per batched forward",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.queue_seconds = Histogram("splitkernels_queue_seconds", "Time a step waited for its batch",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.received = Counter("splitkernels_received_bytes", "Codec frame bytes received", registry=r)
        self.sent = Counter("splitkernels_sent_bytes", "Token reply bytes sent", registry=r)
        manager.observer = self

    def __call__(self, event: str, fields: dict) -> None:
        if event == "step":
            self.steps.labels("prefill" if fields["tokens"] > 1 else "decode").inc()
            self.step_seconds.observe(fields["seconds"])
            self.received.inc(fields["frame_bytes"])
            self.sent.inc(REPLY_BYTES)
            return  # one log line per step would drown the log
        if event == "batch":
            self.batch_size.observe(fields["size"])
            for q in fields["queue_s"]:
                self.queue_seconds.observe(q)
            return
        if event == "opened":
            self.opened.inc()
        elif event == "expired":
            self.expired.inc()
        log_event(event, **fields)

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Serve ``/metrics`` over HTTP on ``host:port`` (0 = a free port); returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)


def log_event(event: str, **fields) -> None:
    """One JSON object per line on the ``splitkernels.serve`` logger (session ids in hex)."""
    if LOG.isEnabledFor(logging.INFO):
        body = {"ts": round(time.time(), 3), "event": event}
        for k, v in fields.items():
            body[k] = f"{v:016x}" if k == "session" and isinstance(v, int) else v
        LOG.info(json.dumps(body))
