"""The joint optimiser: split layer, front/back weight bits, codec setting and maximum sequence
length, under edge/server memory, latency and quality limits (docs/DESIGN.md §1).

The search is exhaustive over a small grid -- the split layers, widths and codec settings of a
calibration table times a list of sequence lengths -- with memory pruning: memory does not
depend on the codec, so a (split, widths, length) that does not fit is never scored. Every
candidate that survives is scored with the cost models of :mod:`.costs` and the measured quality
of :mod:`.quality`; it runs in well under a second for the shipped grids.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..codec import CodecConfig
from ..nn import QuantConfig
from .costs import (
    ComputeModel,
    LatencyEstimate,
    Link,
    MemoryEstimate,
    ModelShape,
    frame_bytes,
    memory,
    split_latency,
)
from .quality import QualityPoint, QualityTable

OBJECTIVES = ("quality", "latency")
PLAN_VERSION = 1
GIB = 2**30


@dataclass(frozen=True)
class Limits:
    """What a plan must satisfy. ``None`` leaves a limit off.

    Memory limits are bytes available to the model on each side (default: what the device
    description leaves after its reserve). ``min_seq_len`` is the shortest maximum sequence
    length acceptable; the optimiser gives each plan the longest candidate length that fits.
    """

    edge_memory_bytes: int | None = None
    server_memory_bytes: int | None = None
    max_token_latency_s: float | None = None
    max_ttft_s: float | None = None
    max_ppl_change: float | None = None
    max_kl: float | None = None
    min_seq_len: int = 1
    sessions: int = 1


@dataclass(frozen=True)
class Scenario:
    """The deployment: model shape, compute on each side, the link and the prompt length."""

    shape: ModelShape
    edge: ComputeModel
    server: ComputeModel
    link: Link
    prompt_tokens: int = 128
    edge_name: str = "edge"
    server_name: str = "server"


@dataclass
class Plan:
    """A split configuration that :func:`splitkernels.runtime.split_model` runs (see :meth:`apply`),
    with the cost model's predictions and the calibration's measured quality."""

    split_layer: int
    front: QuantConfig | None
    back: QuantConfig | None
    codec: CodecConfig
    max_seq_len: int
    predicted: dict[str, Any] = field(default_factory=dict)

    def apply(self, model, limits=None):
        """Split ``model`` in place by this plan; returns the runtime's ``SplitModel``.

        ``limits`` are the runtime's server :class:`~splitkernels.runtime.Limits`; by default
        the plan's ``max_seq_len`` with the runtime's other defaults.
        """
        from ..runtime import Limits as RuntimeLimits
        from ..runtime import split_model

        limits = limits or RuntimeLimits(max_seq_len=self.max_seq_len)
        return split_model(model, self.split_layer, codec=self.codec, opsc=(self.front, self.back), limits=limits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "split_layer": self.split_layer,
            "front": None if self.front is None else self.front.to_dict(),
            "back": None if self.back is None else self.back.to_dict(),
            "codec": self.codec.to_dict(),
            "max_seq_len": self.max_seq_len,
            "predicted": self.predicted,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {d.get('version')!r} is not supported (expected {PLAN_VERSION})")
        return cls(
            split_layer=int(d["split_layer"]),
            front=None if d["front"] is None else QuantConfig.from_dict(d["front"]),
            back=None if d["back"] is None else QuantConfig.from_dict(d["back"]),
            codec=CodecConfig.from_dict(d["codec"]),
            max_seq_len=int(d["max_seq_len"]),
            predicted=dict(d.get("predicted", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    def summary(self) -> str:
        p = self.predicted

        def side(q):
            return "dense fp16" if q is None else str(q)

        c = self.codec
        codec = "passthrough" if c.mode == "passthrough" else (
            f"TS alpha {c.alpha:g} C {c.capacity} + TAB-Q {c.mode}"
            + (f" eps {c.eps:g}" if c.mode == "error" else f" avg {c.avg_bits:g} bits"))
        lines = [
            f"split after layer {self.split_layer}; front {side(self.front)}, back {side(self.back)}; "
            f"codec {codec}; max_seq_len {self.max_seq_len}",
        ]
        if p:
            lines.append(
                f"  per token {1e3 * p['token_latency_s']:.2f} ms (edge {1e3 * p['breakdown']['edge']:.2f}, "
                f"transfer {1e3 * p['breakdown']['transfer']:.2f}, rtt {1e3 * p['breakdown']['rtt']:.2f}, "
                f"server {1e3 * p['breakdown']['server']:.2f}); TTFT {1e3 * p['ttft_s']:.1f} ms; "
                f"{p['token_bytes']} B/token")
            lines.append(
                f"  edge memory {p['edge_memory_bytes'] / GIB:.3f} GiB; server {p['server_memory_bytes'] / GIB:.3f} GiB; "
                f"ppl {100 * p['ppl_change']:+.2f}%, KL {p['kl']:.4f} (measured)")
        return "\n".join(lines)


@dataclass
class Candidate:
    """One scored configuration (internal to the search, exposed for reports)."""

    split_layer: int
    front_bits: int | None
    back_bits: int | None
    codec: CodecConfig
    max_seq_len: int
    memory: MemoryEstimate
    latency: LatencyEstimate
    quality: QualityPoint


class Infeasible(Exception):
    """No configuration meets the limits; ``binding`` names the constraint that rules the last ones out."""

    def __init__(self, binding: str, explanation: str) -> None:
        super().__init__(explanation)
        self.binding = binding
        self.explanation = explanation


@dataclass
class PlanResult:
    """The chosen plan, the runner-up alternatives (best first) and how many candidates were scored."""

    plan: Plan
    alternatives: list[Plan]
    candidates_scored: int


def _quant(bits: int | None, group_size: int, method: str = "rtn") -> QuantConfig | None:
    return None if bits is None else QuantConfig(bits, group_size, method=method)


def _usable_codec(point: QualityPoint) -> bool:
    # Mode "budget" spreads bits over the rows of a frame: its calibration (long frames) does
    # not describe one-token decode frames, so plans use per-token modes only.
    return point.codec is None or point.codec.get("mode") != "budget"


def to_plan(c: Candidate, group_size: int, sessions: int) -> Plan:
    lat, mem, q = c.latency, c.memory, c.quality
    return Plan(
        split_layer=c.split_layer,
        front=_quant(c.front_bits, group_size, c.quality.front_method),
        back=_quant(c.back_bits, group_size),
        codec=c.codec,
        max_seq_len=c.max_seq_len,
        predicted={
            "token_latency_s": lat.token_s,
            "ttft_s": lat.ttft_s,
            "breakdown": lat.breakdown(),
            "token_bytes": lat.token_bytes,
            "prompt_bytes": lat.prompt_bytes,
            "edge_memory_bytes": mem.edge_total,
            "server_memory_bytes": mem.server_total(sessions),
            "ppl_change": q.ppl_change,
            "kl": q.kl,
            "bits_per_element": q.bits_per_element,
            "modelled": "latency and memory are modelled (costs.py); quality is measured (calibration table)",
        },
    )


def _codec_of(point: QualityPoint) -> CodecConfig:
    return CodecConfig.passthrough() if point.codec is None else CodecConfig.from_dict(point.codec)


def plan(
    scenario: Scenario,
    table: QualityTable,
    limits: Limits,
    objective: str = "quality",
    seq_lens: tuple[int, ...] = (512, 1024, 2048, 4096, 8192),
    alternatives: int = 3,
    front_methods: tuple[str, ...] = ("rtn",),
) -> PlanResult:
    """Search every calibrated (split, front bits, back bits, codec) with every sequence length.

    Objective ``"quality"``: lowest KL (then lower latency) under the latency and memory limits;
    ``"latency"``: lowest per-token latency (then lower KL) under the quality and memory limits.
    Each (split, widths, codec) gets the longest length in ``seq_lens`` that fits; ties prefer
    the longer length. Only points whose front was quantised with one of ``front_methods`` are
    candidates (a ``"gptq"`` plan needs calibration ids when it is applied). Raises
    :class:`Infeasible` naming the binding constraint.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    lens = sorted({int(n) for n in seq_lens if n >= limits.min_seq_len}, reverse=True)
    if not lens:
        raise Infeasible("max_seq_len", f"no candidate sequence length in {sorted(seq_lens)} reaches the "
                                        f"required min_seq_len {limits.min_seq_len}")
    shape = scenario.shape
    points = [p for p in table.points.values() if _usable_codec(p) and 1 <= p.split_layer < shape.num_layers
              and p.front_method in front_methods]
    if not points:
        raise Infeasible("calibration", "the calibration table has no usable points for this model "
                                        "(mode-'error' or lossless codecs at split layers inside the model)")
    # Closest misses per constraint, for the explanation when nothing survives.
    miss: dict[str, tuple[float, str]] = {}

    def note(kind: str, value: float, what: str) -> None:
        if kind not in miss or value < miss[kind][0]:
            miss[kind] = (value, what)

    edge_cap = limits.edge_memory_bytes
    server_cap = limits.server_memory_bytes
    memo: dict[tuple, MemoryEstimate] = {}
    feasible: list[Candidate] = []
    scored = 0
    for p in points:
        front, back = _quant(p.front_bits, table.group_size, p.front_method), _quant(p.back_bits, table.group_size)
        method = "" if p.front_method == "rtn" else f" {p.front_method}"
        desc = f"split {p.split_layer}, front {p.front_bits or 16}-bit{method}, back {p.back_bits or 16}-bit"
        chosen = None
        for n in lens:
            key = (p.split_layer, p.front_bits, p.back_bits, n)
            if key not in memo:
                memo[key] = memory(shape, p.split_layer, front, back, n)
            mem = memo[key]
            if edge_cap is not None and mem.edge_total > edge_cap:
                note("edge memory", mem.edge_total, f"{desc}, max_seq_len {n}")
                continue
            if server_cap is not None and mem.server_total(limits.sessions) > server_cap:
                note("server memory", mem.server_total(limits.sessions), f"{desc}, max_seq_len {n}")
                continue
            codec = _codec_of(p)
            token_b = frame_bytes(1, shape.hidden, p.code_bits, p.outliers_per_token)
            prompt_b = frame_bytes(scenario.prompt_tokens, shape.hidden, p.code_bits, p.outliers_per_token)
            lat = split_latency(shape, scenario.edge, scenario.server, scenario.link, p.split_layer, front, back,
                                token_b, prompt_b, scenario.prompt_tokens, n)
            scored += 1
            if limits.max_token_latency_s is not None and lat.token_s > limits.max_token_latency_s:
                note("per-token latency", lat.token_s, f"{desc}, max_seq_len {n}")
                continue
            if limits.max_ttft_s is not None and lat.ttft_s > limits.max_ttft_s:
                note("time to first token", lat.ttft_s, f"{desc}, max_seq_len {n}")
                continue
            chosen = Candidate(p.split_layer, p.front_bits, p.back_bits, codec, n, mem, lat, p)
            break
        if chosen is None:
            continue
        if limits.max_kl is not None and p.kl > limits.max_kl:
            note("KL divergence", p.kl, desc)
            continue
        if limits.max_ppl_change is not None and p.ppl_change > limits.max_ppl_change:
            note("perplexity change", p.ppl_change, desc)
            continue
        feasible.append(chosen)

    if not feasible:
        raise _explain(miss, limits)
    if objective == "quality":
        feasible.sort(key=lambda c: (round(c.quality.kl, 6), c.latency.token_s, -c.max_seq_len))
    else:
        feasible.sort(key=lambda c: (round(c.latency.token_s, 7), c.quality.kl, -c.max_seq_len))
    plans = [to_plan(c, table.group_size, limits.sessions) for c in feasible[: 1 + alternatives]]
    return PlanResult(plans[0], plans[1:], scored)


_LIMIT_OF = {
    "edge memory": ("edge_memory_bytes", lambda v: f"{v / GIB:.3f} GiB"),
    "server memory": ("server_memory_bytes", lambda v: f"{v / GIB:.3f} GiB"),
    "per-token latency": ("max_token_latency_s", lambda v: f"{1e3 * v:.2f} ms"),
    "time to first token": ("max_ttft_s", lambda v: f"{1e3 * v:.1f} ms"),
    "KL divergence": ("max_kl", lambda v: f"{v:.4f}"),
    "perplexity change": ("max_ppl_change", lambda v: f"{100 * v:+.2f}%"),
}


def _explain(miss: dict[str, tuple[float, str]], limits: Limits) -> Infeasible:
    # Constraints are applied in this order, so the last one that rejected anything is the one
    # that removed the final survivors: it binds.
    order = ["edge memory", "server memory", "per-token latency", "time to first token", "KL divergence",
             "perplexity change"]
    binding = [k for k in order if k in miss][-1]
    attr, fmt = _LIMIT_OF[binding]
    best, where = miss[binding]
    lines = [f"infeasible: {binding} is the binding constraint -- the best configuration that passes every "
             f"earlier check needs {fmt(best)} ({where}), the limit is {fmt(getattr(limits, attr))}."]
    for k in order:
        if k in miss and k != binding:
            a, f = _LIMIT_OF[k]
            lines.append(f"  also limiting: {k} (closest {f(miss[k][0])} vs limit {f(getattr(limits, a))})")
    return Infeasible(binding, "\n".join(lines))
