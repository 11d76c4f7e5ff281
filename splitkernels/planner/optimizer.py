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
from typing import Any, Callable, Sequence

import torch

from ..codec import CodecConfig, CodecConfigV2
from ..codec.rate import RatePolicy, expected_bits
from ..codec.spec import config_from_dict, config_to_dict, is_v2_spec
from ..nn import QuantConfig
from .costs import (
    ComputeModel,
    LatencyEstimate,
    Link,
    MemoryEstimate,
    ModelShape,
    frame_bytes,
    frame_bytes_v2,
    memory,
    split_latency,
)
from .quality import QualityPoint, QualityTable
from .speculation import DraftOption, SpeculationChoice, choose_speculation

# "latency": the fastest plan within the quality limits (the default); "quality": the lowest KL
# within the latency and memory limits; "lossless": the fastest plan whose transfer is lossless.
OBJECTIVES = ("latency", "quality", "lossless")
DEFAULT_OBJECTIVE = "latency"
# Quality limits a plan meets unless told otherwise: KL <= 0.01 nats/token and perplexity at most
# +1% over the unsplit model -- the codec's default setting measures KL 0.0045-0.0056 and
# +0.1% to +0.75% on SmolLM2 at 8-bit weights (bench/results/e2e.md), so these leave it room.
DEFAULT_MAX_KL = 0.01
DEFAULT_MAX_PPL_CHANGE = 0.01
PLAN_VERSION = 1
GIB = 2**30
MIB = 2**20
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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


def dtype_name(dtype: torch.dtype) -> str:
    """``"float16"`` for ``torch.float16``: how plans spell a dtype."""
    return str(dtype).replace("torch.", "")


def _dtype(name: str, field_name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{field_name} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclass
class Plan:
    """A split configuration that :func:`splitkernels.runtime.split_model` runs (see :meth:`apply`),
    with the cost model's predictions and the calibration's measured quality.

    ``dtype`` is the precision of dense weights, activations and KV caches on both sides (what
    the memory model counts); ``wire_dtype`` is what the edge casts the split-layer hidden state
    to before the codec; ``prompt_tokens`` is the prompt length the edge's activation memory is
    sized for.
    """

    split_layer: int
    front: QuantConfig | None
    back: QuantConfig | None
    codec: CodecConfig | CodecConfigV2  # v2: calibrated for this model and split, stored whole
    max_seq_len: int
    predicted: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float16"
    wire_dtype: str = "float16"
    prompt_tokens: int = 128

    def __post_init__(self) -> None:
        _dtype(self.dtype, "dtype")
        _dtype(self.wire_dtype, "wire_dtype")
        for name in ("max_seq_len", "prompt_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")

    def split_config(self):
        """The runtime's :class:`~splitkernels.runtime.SplitConfig` for this plan."""
        from ..runtime import SplitConfig

        return SplitConfig(self.split_layer, self.codec, self.front, self.back,
                           wire_dtype=_dtype(self.wire_dtype, "wire_dtype"))

    def apply(self, model, limits=None):
        """Split ``model`` in place by this plan; returns the runtime's ``SplitModel``.

        The model is cast to the plan's ``dtype`` (the precision its memory was planned for),
        hidden states travel in ``wire_dtype``, and the in-process server holds at most
        ``max_seq_len`` positions. ``limits`` are the runtime's server
        :class:`~splitkernels.runtime.Limits`; their ``max_seq_len`` must be the plan's.
        """
        from ..runtime import Limits as RuntimeLimits
        from ..runtime import split_model

        limits = limits or RuntimeLimits(max_seq_len=self.max_seq_len)
        if limits.max_seq_len != self.max_seq_len:
            raise ValueError(f"limits.max_seq_len {limits.max_seq_len} differs from the plan's max_seq_len "
                             f"{self.max_seq_len}")
        dtype = _dtype(self.dtype, "dtype")
        if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
            model.to(dtype)
        split = split_model(model, self.split_config(), limits=limits)
        if split.manager.max_seq_len < self.max_seq_len:
            split.close()
            raise ValueError(f"max_seq_len {self.max_seq_len} is more positions than the model holds "
                             f"({split.manager.max_seq_len})")
        return split

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "split_layer": self.split_layer,
            "front": None if self.front is None else self.front.to_dict(),
            "back": None if self.back is None else self.back.to_dict(),
            "codec": config_to_dict(self.codec),
            "max_seq_len": self.max_seq_len,
            "dtype": self.dtype,
            "wire_dtype": self.wire_dtype,
            "prompt_tokens": self.prompt_tokens,
            "predicted": self.predicted,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """From :meth:`to_dict`; plans written before ``dtype``/``wire_dtype``/``prompt_tokens``
        existed assumed fp16 and 128-token prompts, which are the defaults."""
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {d.get('version')!r} is not supported (expected {PLAN_VERSION})")
        return cls(
            split_layer=int(d["split_layer"]),
            front=None if d["front"] is None else QuantConfig.from_dict(d["front"]),
            back=None if d["back"] is None else QuantConfig.from_dict(d["back"]),
            codec=config_from_dict(d["codec"]),
            max_seq_len=int(d["max_seq_len"]),
            predicted=dict(d.get("predicted", {})),
            dtype=d.get("dtype", "float16"),
            wire_dtype=d.get("wire_dtype", "float16"),
            prompt_tokens=int(d.get("prompt_tokens", 128)),
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    def summary(self) -> str:
        p = self.predicted

        def side(q):
            return f"dense {self.dtype}" if q is None else str(q)

        codec = codec_text(self.codec)
        lines = [
            f"split after layer {self.split_layer}; front {side(self.front)}, back {side(self.back)}; "
            f"codec {codec} on a {self.wire_dtype} wire; max_seq_len {self.max_seq_len}",
        ]
        if p:
            lines.append(
                f"  per token {1e3 * p['token_latency_s']:.2f} ms (edge {1e3 * p['breakdown']['edge']:.2f}, "
                f"transfer {1e3 * p['breakdown']['transfer']:.2f}, rtt {1e3 * p['breakdown']['rtt']:.2f}, "
                f"server {1e3 * p['breakdown']['server']:.2f}); TTFT {1e3 * p['ttft_s']:.1f} ms; "
                f"frame {p.get('frame_bytes_token', '?')} B/token ({p['bits_per_element']:.2f} bits/element "
                f"calibrated), {p['token_bytes']} B/token with messages")
            mem = p.get("edge_memory")
            if mem:
                lines.append(
                    f"  edge memory {p['edge_memory_bytes'] / GIB:.3f} GiB = embedding {mem['embedding'] / MIB:.1f} MiB"
                    f" + layers 1..{self.split_layer} {mem['layer_weights'] / MIB:.1f} MiB + KV cache "
                    f"{mem['kv_cache'] / MIB:.1f} MiB (at {self.max_seq_len} positions) + activations "
                    f"{mem['activations'] / MIB:.1f} MiB (a {self.prompt_tokens}-token prompt) + runtime "
                    f"{mem['runtime_overhead'] / MIB:.0f} MiB; server {p['server_memory_bytes'] / GIB:.3f} GiB "
                    f"(weights {p['server_weight_bytes'] / MIB:.1f} MiB)")
            else:
                lines.append(f"  edge memory {p['edge_memory_bytes'] / GIB:.3f} GiB; "
                             f"server {p['server_memory_bytes'] / GIB:.3f} GiB")
            lines.append(f"  ppl {100 * p['ppl_change']:+.2f}%, KL {p['kl']:.4f} (measured by calibration)")
            cons = p.get("constraints")
            if cons:
                margins = "; ".join(f"{k} {m['value_text']} of {m['limit_text']} ({m['margin_text']} left)"
                                    for k, m in cons["margins"].items())
                lines.append(f"  binding: {cons['binding']}" + (f"; margins: {margins}" if margins else ""))
        return "\n".join(lines)


def codec_text(c: CodecConfig | CodecConfigV2) -> str:
    """A plan's codec configuration in a few words."""
    if isinstance(c, CodecConfigV2):
        return (f"v2 ({c.info.get('scales', 'calibrated')} scales, kmax {c.kmax}, about "
                f"{c.info.get('estimated_bits', float('nan')):.2f} bits/element, fingerprint {c.fingerprint[:12]})")
    if c.mode == "passthrough":
        return "passthrough"
    return (f"TS alpha {c.alpha:g} C {c.capacity} + TAB-Q {c.mode}"
            + (f" eps {c.eps:g}" if c.mode == "error" else f" avg {c.avg_bits:g} bits"))


# Calibrates a v2 spec (a calibration table point's codec) for the model at a split layer.
CodecCalibrator = Callable[[int, dict], CodecConfigV2]


@dataclass
class Candidate:
    """One scored configuration (internal to the search, exposed for reports). A v2 candidate's
    ``codec`` is its spec until the plan is made (:func:`plan` calibrates the chosen ones)."""

    split_layer: int
    front_bits: int | None
    back_bits: int | None
    codec: CodecConfig | dict
    max_seq_len: int
    memory: MemoryEstimate
    latency: LatencyEstimate
    quality: QualityPoint
    frame_bytes: tuple[int, int] = (0, 0)  # (one-token frame, prompt frame)


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


def to_plan(c: Candidate, group_size: int, sessions: int, dtype: str = "float16", wire_dtype: str = "float16",
            prompt_tokens: int = 128, constraints: dict | None = None,
            speculation: SpeculationChoice | None = None) -> Plan:
    lat, mem, q = c.latency, c.memory, c.quality
    extra = {} if speculation is None else {"speculation": {
        "drafter": speculation.drafter, "k": speculation.k, "token_latency_s": speculation.token_s,
        "tokens_per_round": speculation.tokens_per_round}}
    return Plan(
        split_layer=c.split_layer,
        front=_quant(c.front_bits, group_size, c.quality.front_method),
        back=_quant(c.back_bits, group_size),
        codec=c.codec,
        max_seq_len=c.max_seq_len,
        dtype=dtype,
        wire_dtype=wire_dtype,
        prompt_tokens=prompt_tokens,
        predicted={
            "token_latency_s": lat.token_s,
            "ttft_s": lat.ttft_s,
            "breakdown": lat.breakdown(),
            "token_bytes": lat.token_bytes,
            "prompt_bytes": lat.prompt_bytes,
            "frame_bytes_token": c.frame_bytes[0],
            "frame_bytes_prompt": c.frame_bytes[1],
            "edge_memory_bytes": mem.edge_total,
            "edge_memory": mem.breakdown(),
            "server_memory_bytes": mem.server_total(sessions),
            "server_weight_bytes": mem.server_weights,
            "server_kv_bytes": mem.server_session,
            "ppl_change": q.ppl_change,
            "kl": q.kl,
            "bits_per_element": q.bits_per_element,
            "constraints": constraints or {},
            "modelled": "latency and memory are modelled (costs.py); quality is measured (calibration table)",
            **extra,
        },
    )


def _speculation(c: Candidate, drafters: Sequence[DraftOption], limits: Limits) -> SpeculationChoice:
    """The drafter and k for candidate ``c``, among drafters that fit in the edge memory it leaves."""
    free = None if limits.edge_memory_bytes is None else limits.edge_memory_bytes - c.memory.edge_total
    return choose_speculation(c.latency, drafters, edge_bytes_free=free)


def _codec_of(point: QualityPoint) -> CodecConfig | dict:
    if point.codec is None:
        return CodecConfig.passthrough()
    return dict(point.codec) if is_v2_spec(point.codec) else CodecConfig.from_dict(point.codec)


def _frame_sizes(p: QualityPoint, codec: CodecConfig | dict, hidden: int, prompt_tokens: int,
                 wire: torch.dtype) -> tuple[int, int]:
    """(one-token frame, prompt frame) bytes for a calibration point; a v2 one-token frame at the
    first decode position (the position shifts only fall after it), the prompt from position 0."""
    if isinstance(codec, dict):
        shifts = p.position_shift
        sizes = (frame_bytes_v2(1, hidden, p.code_bits, p.outliers_per_token, wire, position_shift=shifts, id_bits=p.id_bits,
                                start=prompt_tokens),
                 frame_bytes_v2(prompt_tokens, hidden, p.code_bits, p.outliers_per_token, wire, position_shift=shifts,
                                id_bits=p.id_bits))
        rate = codec.get("info", {}).get("rate")
        if rate is None:
            return sizes
        # The edge's rate control moves every frame towards the policy's bits (splitkernels.codec.rate).
        policy = RatePolicy.from_dict(rate)
        return tuple(round(expected_bits(8.0 * n / (t * hidden), policy) * t * hidden / 8.0)
                     for n, t in zip(sizes, (1, prompt_tokens)))
    # A raw (passthrough) token is as wide as the wire dtype, whatever the calibration sent.
    code_bits = 8.0 * wire.itemsize if codec.mode == "passthrough" else p.code_bits
    return (frame_bytes(1, hidden, code_bits, p.outliers_per_token, wire),
            frame_bytes(prompt_tokens, hidden, code_bits, p.outliers_per_token, wire))


# Constraints in the order they are checked, with what a candidate has for each.
_CHECKS = (
    ("edge memory", "edge_memory_bytes", lambda c, lim: c.memory.edge_total),
    ("server memory", "server_memory_bytes", lambda c, lim: c.memory.server_total(lim.sessions)),
    ("per-token latency", "max_token_latency_s", lambda c, lim: c.latency.token_s),
    ("time to first token", "max_ttft_s", lambda c, lim: c.latency.ttft_s),
    ("KL divergence", "max_kl", lambda c, lim: c.quality.kl),
    ("perplexity change", "max_ppl_change", lambda c, lim: c.quality.ppl_change),
)


def _violations(c: Candidate, limits: Limits) -> list[tuple[str, float]]:
    """The limits ``c`` breaks, in check order, each with ``c``'s value."""
    out = []
    for name, attr, value in _CHECKS:
        limit = getattr(limits, attr)
        v = value(c, limits)
        if limit is not None and v > limit:
            out.append((name, v))
    return out


def _objective_key(objective: str):
    if objective == "quality":
        return lambda c: (round(c.quality.kl, 6), c.latency.token_s, -c.max_seq_len)
    return lambda c: (round(c.latency.token_s, 7), c.quality.kl, -c.max_seq_len)


def _constraints(chosen: Candidate, rejected: list[tuple[Candidate, list]], limits: Limits, objective: str) -> dict:
    """The binding constraint of ``chosen`` -- the limit that rules out the best candidate the
    objective prefers to it -- and the margin left on every limit that is set."""
    key = _objective_key(objective)
    better = [(key(c), fails) for c, fails in rejected if key(c) < key(chosen)]
    if better:
        fails = min(better, key=lambda kv: kv[0])[1]
        binding = " and ".join(name for name, _ in fails)
    else:
        what = "more accurate" if objective == "quality" else "faster"
        binding = f"none (no {what} configuration in the search space)"
    margins = {}
    for name, attr, value in _CHECKS:
        limit = getattr(limits, attr)
        if limit is None:
            continue
        v = value(chosen, limits)
        fmt = _LIMIT_OF[name][1]
        margins[name] = {"value": v, "limit": limit, "margin": limit - v, "value_text": fmt(v),
                         "limit_text": fmt(limit), "margin_text": fmt(limit - v)}
    return {"binding": binding, "objective": objective, "margins": margins}


def plan(
    scenario: Scenario,
    table: QualityTable,
    limits: Limits,
    objective: str = DEFAULT_OBJECTIVE,
    seq_lens: tuple[int, ...] = (512, 1024, 2048, 4096, 8192),
    alternatives: int = 3,
    front_methods: tuple[str, ...] = ("rtn",),
    dtype: str = "float16",
    wire_dtype: str = "float16",
    drafters: Sequence[DraftOption] = (),
    calibrate_codec: CodecCalibrator | None = None,
) -> PlanResult:
    """Search every calibrated (split, front bits, back bits, codec) with every sequence length.

    Objective ``"latency"`` (default): lowest per-token latency (then lower KL) under the quality
    and memory limits -- lossless transfer wins only where it is also the fastest;
    ``"quality"``: lowest KL (then lower latency) under the latency and memory limits;
    ``"lossless"``: lowest latency among lossless (passthrough) transfers.
    Each (split, widths, codec) gets the longest length in ``seq_lens`` that meets every limit;
    ties prefer the longer length. Only points whose front was quantised with one of
    ``front_methods`` are candidates (a ``"gptq"`` plan needs calibration ids when it is applied).
    ``dtype`` is the precision of dense weights, activations and KV caches (``scenario.shape``'s
    ``dtype_bytes`` must match it); hidden states go on the wire as ``wire_dtype``. Every plan
    records its binding constraint and its margins (``predicted["constraints"]``). With
    ``drafters`` (measured acceptances, :class:`~.speculation.DraftOption`), each plan also
    records the drafter and drafts per round that speculative decoding should use with it and the
    per-token latency that buys (``predicted["speculation"]``, see
    :func:`~.speculation.choose_speculation`; the ranking stays by one token per round trip).
    Codec v2 points of the table are candidates only with ``calibrate_codec(split_layer, spec)``,
    which fits the chosen plans' v2 configs for the model (each plan stores its config whole).
    Raises :class:`Infeasible` naming the binding constraint.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    width = _dtype(dtype, "dtype").itemsize
    if scenario.shape.dtype_bytes != width:
        raise ValueError(f"dtype {dtype} is {width} bytes wide but the model shape counts "
                         f"{scenario.shape.dtype_bytes}-byte values (ModelShape.dtype_bytes)")
    wire = _dtype(wire_dtype, "wire_dtype")
    lens = sorted({int(n) for n in seq_lens if n >= limits.min_seq_len}, reverse=True)
    if not lens:
        raise Infeasible("max_seq_len", f"no candidate sequence length in {sorted(seq_lens)} reaches the "
                                        f"required min_seq_len {limits.min_seq_len}")
    shape = scenario.shape
    points = [p for p in table.points.values() if _usable_codec(p) and 1 <= p.split_layer < shape.num_layers
              and p.front_method in front_methods and (calibrate_codec is not None or not is_v2_spec(p.codec))
              and (objective != "lossless" or p.codec is None or p.codec.get("mode") == "passthrough")]
    if not points:
        raise Infeasible("calibration", "the calibration table has no usable points for this model "
                                        "(mode-'error' or lossless codecs at split layers inside the model; "
                                        "v2 points only with calibrate_codec)")
    # Closest misses per constraint, for the explanation when nothing survives.
    miss: dict[str, tuple[float, str]] = {}
    memo: dict[tuple, MemoryEstimate] = {}
    feasible: list[Candidate] = []
    rejected: list[tuple[Candidate, list]] = []
    scored = 0
    for p in points:
        front, back = _quant(p.front_bits, table.group_size, p.front_method), _quant(p.back_bits, table.group_size)
        method = "" if p.front_method == "rtn" else f" {p.front_method}"
        desc = f"split {p.split_layer}, front {p.front_bits or 16}-bit{method}, back {p.back_bits or 16}-bit"
        codec = _codec_of(p)
        token_b, prompt_b = _frame_sizes(p, codec, shape.hidden, scenario.prompt_tokens, wire)
        for n in lens:
            key = (p.split_layer, p.front_bits, p.back_bits, n)
            if key not in memo:
                memo[key] = memory(shape, p.split_layer, front, back, n, scenario.prompt_tokens)
            lat = split_latency(shape, scenario.edge, scenario.server, scenario.link, p.split_layer, front, back,
                                token_b, prompt_b, scenario.prompt_tokens, n)
            scored += 1
            c = Candidate(p.split_layer, p.front_bits, p.back_bits, codec, n, memo[key], lat, p, (token_b, prompt_b))
            fails = _violations(c, limits)
            if not fails:
                feasible.append(c)
                break
            rejected.append((c, fails))
            name, value = fails[0]
            if name not in miss or value < miss[name][0]:
                miss[name] = (value, desc if name in ("KL divergence", "perplexity change") else
                              f"{desc}, max_seq_len {n}")

    if not feasible:
        raise _explain(miss, limits)
    key = _objective_key(objective)
    feasible.sort(key=key)
    chosen = feasible[: 1 + alternatives]
    configs: dict[tuple, CodecConfigV2] = {}
    for c in chosen:
        if isinstance(c.codec, dict):  # calibrated once per (split, spec), stored whole in the plan
            key = (c.split_layer, json.dumps(c.codec, sort_keys=True))
            if key not in configs:
                configs[key] = calibrate_codec(c.split_layer, dict(c.codec))
            c.codec = configs[key]
    plans = [to_plan(c, table.group_size, limits.sessions, dtype, wire_dtype, scenario.prompt_tokens,
                     _constraints(c, rejected, limits, objective),
                     _speculation(c, drafters, limits) if drafters else None)
             for c in chosen]
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
