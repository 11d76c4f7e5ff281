"""What one split generation cost: per-step timings and bytes, and a per-generation summary."""
from __future__ import annotations

import os
import resource
from dataclasses import asdict, dataclass, field

FP16_BYTES = 2


@dataclass(frozen=True)
class StepMetrics:
    """One edge -> server -> edge exchange.

    ``link_s`` is the round trip minus the server's own decode and compute time (wire, transport
    stack and any emulated link); ``frame_bytes`` is the codec frame alone, ``bytes_up`` the whole
    request message and ``bytes_down`` the reply.
    """

    tokens: int
    edge_compute_s: float
    encode_s: float
    frame_bytes: int
    bytes_up: int
    bytes_down: int
    link_s: float
    decode_s: float
    server_compute_s: float
    total_s: float


@dataclass
class GenerationMetrics:
    """All steps of one generation; step 0 is the prefill."""

    hidden_size: int
    steps: list[StepMetrics] = field(default_factory=list)
    ttft_s: float = 0.0
    total_s: float = 0.0
    edge_kv_bytes: int = 0  # the edge's KV cache at the end of the generation
    server_kv_bytes: int = 0  # the server session's KV cache after the last step

    def summary(self) -> dict:
        """TTFT, per-token latency, bits per element, bytes per token vs fp16, mean time per component.

        Per-token numbers average the decode steps (one token each); with no decode step they
        fall back to the prefill.
        """
        if not self.steps:
            return {"steps": 0}
        decode = self.steps[1:] or self.steps
        d = self.hidden_size
        elements = sum(s.tokens for s in self.steps) * d
        frame_bytes = sum(s.frame_bytes for s in self.steps)
        dec_tokens = sum(s.tokens for s in decode)
        bytes_per_token = sum(s.frame_bytes for s in decode) / dec_tokens
        fp16_per_token = FP16_BYTES * d

        def mean(name: str, steps: list[StepMetrics]) -> float:
            return sum(getattr(s, name) for s in steps) / len(steps)

        components = ("edge_compute_s", "encode_s", "link_s", "decode_s", "server_compute_s", "total_s")
        return {
            "steps": len(self.steps),
            "prompt_tokens": self.steps[0].tokens,
            "generated_tokens": len(self.steps),
            "ttft_s": self.ttft_s,
            "per_token_s": mean("total_s", decode),
            "tokens_per_s": len(decode) / sum(s.total_s for s in decode),
            "total_s": self.total_s,
            "bits_per_element": 8.0 * frame_bytes / elements,
            "bits_per_element_prefill": 8.0 * self.steps[0].frame_bytes / (self.steps[0].tokens * d),
            "bits_per_element_decode": 8.0 * bytes_per_token / d,
            "bytes_per_token": bytes_per_token,
            "fp16_bytes_per_token": fp16_per_token,
            "compression_vs_fp16": fp16_per_token / bytes_per_token,
            "bytes_up": sum(s.bytes_up for s in self.steps),
            "bytes_down": sum(s.bytes_down for s in self.steps),
            "edge_kv_bytes": self.edge_kv_bytes,
            "server_kv_bytes": self.server_kv_bytes,
            "prefill": {k: getattr(self.steps[0], k) for k in components},
            "decode_mean": {k: mean(k, decode) for k in components},
        }

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "steps": [asdict(s) for s in self.steps]}


def process_rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc), else its peak from getrusage."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
