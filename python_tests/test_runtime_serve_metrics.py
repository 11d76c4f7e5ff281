"""Prometheus metrics and JSON logs of a serving SessionManager (batched and unbatched)."""
from __future__ import annotations

import json
import logging
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from splitkernels.models import tiny_model
from splitkernels.runtime import Limits, split_model
from splitkernels.runtime.batching import BatchingSessionManager
from splitkernels.runtime.serve_metrics import ServerMetrics
from splitkernels.runtime.transport import InProcessTransport


def _samples(text: str) -> dict:
    return {s.name + json.dumps(s.labels, sort_keys=True) if s.labels else s.name: s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.mark.parametrize("batched", [False, True])
def test_metrics_count_what_happened(batched, caplog):
    sm = split_model(tiny_model("llama", seed=4, num_layers=2, hidden=32), 1, limits=Limits(max_sessions=4))
    manager = BatchingSessionManager(sm.server, sm.manager.limits, sm.fingerprint) if batched else sm.manager
    metrics = ServerMetrics(manager)
    ids = torch.randint(0, 255, (1, 5), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="splitkernels.serve"):
        for _ in range(2):
            sm.generate(ids, 6, transport=InProcessTransport(manager))
    s = _samples(metrics.exposition().decode())
    assert s['splitkernels_steps_total{"kind": "prefill"}'] == 2
    assert s['splitkernels_steps_total{"kind": "decode"}'] == 10
    assert s["splitkernels_step_seconds_count"] == 12 and s["splitkernels_step_seconds_sum"] > 0
    assert s["splitkernels_sessions_opened_total"] == 2 and s["splitkernels_sessions"] == 0
    assert s["splitkernels_kv_cache_bytes"] == 0
    assert s["splitkernels_received_bytes_total"] > 0 and s["splitkernels_sent_bytes_total"] > 0
    assert s["splitkernels_batch_size_count"] == (12 if batched else 0)
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "splitkernels.serve"]
    assert [e["event"] for e in events] == ["opened", "closed"] * 2
    assert all(len(e["session"]) == 16 and e["ts"] > 0 for e in events)
    if batched:
        manager.shutdown()


def test_metrics_http_endpoint():
    sm = split_model(tiny_model("llama", seed=4, num_layers=2, hidden=32), 1)
    metrics = ServerMetrics(sm.manager)
    server, thread = metrics.serve(0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as r:
            assert "splitkernels_sessions 0.0" in r.read().decode()
    finally:
        server.shutdown()
        thread.join(timeout=10)
