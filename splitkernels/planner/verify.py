"""Check a plan's predictions against the runtime on this machine (``splitkernels plan --verify``).

The plan runs through :func:`splitkernels.runtime.split_model` exactly as written (model dtype,
wire dtype, codec, OPSC weights, max length) behind a :class:`~splitkernels.runtime.link.LinkEmulator`
of the planned link that reports, not waits, its delay. Each prediction sits beside what was
measured:

* bytes: the codec frame of the prompt and of each decoded token, and the request and reply
  messages, counted by the runtime's metrics;
* memory: weights per side and KV cache at the planned ``max_seq_len`` by tensor byte accounting
  (the KV bytes per position measured on the run's own cache), the edge's activations as the peak
  of live tensor bytes during a prefill of the planned prompt length less the KV cache it leaves,
  and the process's resident
  memory beside the runtime overhead plus both halves (reported, not judged: the process also
  holds what loading the model left behind);
* latency: the cost model evaluated with a profile of *this* machine for both sides (measured
  first, :func:`~splitkernels.planner.profile.measure_profile`) against the runtime's per-token time;
* quality: the calibration's KL and perplexity change against the runtime's teacher-forced logits.

Codec-agnostic: whatever ``Plan.split_config()`` builds, the runtime encodes; the checks read only
the frames it sent.
"""
from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..codec import CodecConfig
from ..codec.frame import frame_nbytes
from ..models.shape import ModelShape
from ..runtime.metrics import process_rss_bytes
from .costs import Link, RUNTIME_OVERHEAD_BYTES, memory, split_latency
from .optimizer import DTYPES, Plan, codec_text

# The tolerance the tests and the issue hold bytes and memory to, and per-token latency.
BYTES_TOLERANCE = 0.05
LATENCY_TOLERANCE = 0.25


@dataclass(frozen=True)
class Check:
    """One prediction beside its measurement. ``tolerance`` is relative to the measurement (None:
    reported, not judged)."""

    name: str
    predicted: float
    measured: float
    unit: str
    tolerance: float | None = None
    note: str = ""

    @property
    def error(self) -> float:
        """(predicted - measured) / measured; 0 when both are 0."""
        if self.measured == 0:
            return 0.0 if self.predicted == 0 else float("inf")
        return (self.predicted - self.measured) / abs(self.measured)

    @property
    def ok(self) -> bool | None:
        return None if self.tolerance is None else abs(self.error) <= self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "error": self.error, "ok": self.ok}


@dataclass
class Verification:
    """All checks of one plan on this machine."""

    checks: list[Check] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def ok(self) -> bool:
        """Every judged check within its tolerance."""
        return all(c.ok is not False for c in self.checks)

    @property
    def sizes_ok(self) -> bool:
        """Every judged bytes and memory check within its tolerance (deterministic, unlike timings)."""
        return all(c.ok is not False for c in self.checks if c.unit in ("B", "MiB", "bits"))

    def to_dict(self) -> dict:
        return {"ok": self.ok, "sizes_ok": self.sizes_ok, "info": self.info,
                "checks": [c.to_dict() for c in self.checks]}

    def table(self) -> str:
        """A readable predicted-vs-measured table."""
        rows = [f"{'check':<38} {'predicted':>14} {'measured':>14} {'error':>8}  verdict"]
        for c in self.checks:
            fmt = _FORMATS.get(c.unit, lambda v: f"{v:.4g}")
            verdict = "-" if c.ok is None else (f"ok (<= {100 * c.tolerance:.0f}%)" if c.ok
                                                else f"OFF (> {100 * c.tolerance:.0f}%)")
            err = f"{100 * c.error:+.1f}%" if abs(c.error) != float("inf") else "inf"
            rows.append(f"{c.name:<38} {fmt(c.predicted):>14} {fmt(c.measured):>14} {err:>8}  {verdict}"
                        + (f"  [{c.note}]" if c.note else ""))
        return "\n".join(rows)


_FORMATS = {
    "B": lambda v: f"{v:,.1f} B",
    "MiB": lambda v: f"{v / 2**20:,.2f} MiB",
    "ms": lambda v: f"{1e3 * v:.2f} ms",
    "bits": lambda v: f"{v:.3f}",
    "nats": lambda v: f"{v:.5f}",
    "%": lambda v: f"{100 * v:+.2f}%",
}


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage that ops create and keep alive inside the block (weights and
    other tensors made before it do not count): the working buffers of a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self._live: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._live.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            # A view allocates nothing (its storage may be a buffer made long before the block).
            if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t._is_view():
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if key in self._live or nbytes == 0:
                continue
            self._live.add(key)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            # Views share the storage; it is freed when the last tensor on it goes.
            weakref.finalize(t, self._release, key, nbytes)
        return out


def predicted_frames(plan: Plan, hidden: int) -> tuple[int, int]:
    """(one-token frame, ``plan.prompt_tokens``-token frame) bytes the plan predicts: its own
    figures when it has them, else exact for a passthrough codec."""
    p = plan.predicted
    if "frame_bytes_token" in p and "frame_bytes_prompt" in p:
        return int(p["frame_bytes_token"]), int(p["frame_bytes_prompt"])
    if not (isinstance(plan.codec, CodecConfig) and plan.codec.mode == "passthrough"):
        raise ValueError("the plan has no predicted frame sizes (predicted.frame_bytes_token/frame_bytes_prompt); "
                         "write it with `splitkernels plan --out`")
    wire = DTYPES[plan.wire_dtype]
    raw = hidden * wire.itemsize
    return (frame_nbytes(1, hidden, wire, 0, raw),
            frame_nbytes(plan.prompt_tokens, hidden, wire, 0, plan.prompt_tokens * raw))


def verify_plan(
    plan: Plan,
    load: Callable[[], nn.Module],
    link: Link,
    prompt_ids: torch.Tensor,
    new_tokens: int = 16,
    eval_ids: torch.Tensor | None = None,
    eval_context: int = 512,
    profile: dict | None = None,
    profile_repeats: int = 2,
    clock: str = "wall",
) -> Verification:
    """Run ``plan`` on the model ``load()`` builds (called once or twice: the split copy and, for
    quality, the unsplit reference) and compare every prediction with the measurement.

    ``prompt_ids`` ``[1, plan.prompt_tokens]`` is the prompt; ``new_tokens`` tokens are decoded.
    ``eval_ids`` (1-D) are scored in windows of ``eval_context`` for KL and perplexity (None: no
    quality check). ``profile`` is a measured profile of this machine
    (:func:`~splitkernels.planner.profile.measure_profile`); None measures one first, best of
    ``profile_repeats``; the generation runs as many times and the least disturbed run counts.
    ``clock="cpu"`` times compute as this process's CPU time (profile and runtime alike) and adds
    the emulated link: on a machine other work shares, what it would take alone (single-threaded
    runs: ``OMP_NUM_THREADS=1``); ``"wall"`` times elapsed time.
    """
    from ..runtime.link import LinkEmulator, link_delay
    from .profile import CLOCKS, Profile, measure_profile

    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")

    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids.unsqueeze(0)
    if prompt_ids.shape[-1] != plan.prompt_tokens:
        raise ValueError(f"prompt_ids must hold the plan's prompt_tokens={plan.prompt_tokens} tokens, "
                         f"got {prompt_ids.shape[-1]}")
    if prompt_ids.shape[-1] + new_tokens - 1 > plan.max_seq_len:
        raise ValueError(f"prompt + new_tokens - 1 = {prompt_ids.shape[-1] + new_tokens - 1} exceeds the plan's "
                         f"max_seq_len {plan.max_seq_len}")
    dtype = DTYPES[plan.dtype]
    model = load().to(dtype)
    shape = ModelShape.from_model(model, dtype_bytes=dtype.itemsize)
    mem = memory(shape, plan.split_layer, plan.front, plan.back, plan.max_seq_len, plan.prompt_tokens)
    token_frame, prompt_frame = predicted_frames(plan, shape.hidden)
    if profile is None:
        formats = list({str(q): q for q in (plan.front, plan.back)}.values())
        profile = measure_profile(model, formats, plan.prompt_tokens, decode_steps=8, repeats=profile_repeats,
                                  codec=plan.codec, wire_dtype=DTYPES[plan.wire_dtype], clock=clock)
    here = Profile(profile)
    lat = split_latency(shape, here, here, link, plan.split_layer, plan.front, plan.back, token_frame,
                        prompt_frame, plan.prompt_tokens, plan.prompt_tokens + new_tokens // 2)

    split = plan.apply(model)
    try:
        transport = LinkEmulator(split.transport, link.mbps * 1e6, link.rtt_ms / 1e3, sleep=False)
        split.run(prompt_ids, 2, transport=transport)  # warm-up: first calls of every kernel
        # Best of as many runs as the profile took repeats: the profile keeps its least disturbed
        # repeat, so the runtime is measured the same way (a shared machine's load comes and goes).
        runs, cpu = [], []
        for _ in range(max(profile_repeats, 1)):
            t0 = time.process_time()
            split.run(prompt_ids, 1, transport=transport)
            t1 = time.process_time()
            runs.append(split.run(prompt_ids, new_tokens, transport=transport).metrics)
            cpu.append((time.process_time() - t1 - (t1 - t0)) / max(len(runs[-1].steps) - 1, 1))
        best = min(range(len(runs)), key=lambda i: cpu[i] if clock == "cpu" else
                   _median(s.total_s for s in runs[i].steps[1:]) if len(runs[i].steps) > 1 else 0.0)
        steps = runs[best]
        if len(steps.steps) < 2:
            raise RuntimeError("the model stopped after the prefill; verify needs decode steps (no EOS stop is used)")
        decode = steps.steps[1:]
        summary = steps.summary()
        positions = prompt_ids.shape[-1] + len(decode)
        kv_edge = steps.edge_kv_bytes / positions * plan.max_seq_len
        kv_server = steps.server_kv_bytes / positions * plan.max_seq_len
        work = _edge_prefill_peak(split, prompt_ids)
        checks = [
            Check("prefill frame bytes", prompt_frame, steps.steps[0].frame_bytes, "B", BYTES_TOLERANCE),
            Check("decode frame bytes per token", token_frame, _mean(s.frame_bytes for s in decode), "B",
                  BYTES_TOLERANCE),
            Check("decode request+reply bytes per token", lat.token_bytes,
                  _mean(s.bytes_up + s.bytes_down for s in decode), "B", BYTES_TOLERANCE),
            Check("bits per element, prefill", 8 * prompt_frame / (plan.prompt_tokens * shape.hidden),
                  summary["bits_per_element_prefill"], "bits", BYTES_TOLERANCE),
            Check("bits per element, decode", 8 * token_frame / shape.hidden, summary["bits_per_element_decode"],
                  "bits", BYTES_TOLERANCE),
            Check("edge weights", mem.edge_weights, split.edge.weight_bytes(), "MiB", BYTES_TOLERANCE),
            Check("edge KV cache at max_seq_len", mem.edge_kv, kv_edge, "MiB", BYTES_TOLERANCE),
            Check("edge activations (peak tensor bytes)", mem.edge_working, work, "MiB", None,
                  "prefill of the planned prompt"),
            Check("edge weights + KV + activations", mem.edge_model, split.edge.weight_bytes() + kv_edge + work,
                  "MiB", BYTES_TOLERANCE),
            Check("server weights", mem.server_weights, split.server.weight_bytes(), "MiB", BYTES_TOLERANCE),
            Check("server KV cache at max_seq_len", mem.server_session, kv_server, "MiB", BYTES_TOLERANCE),
        ]
        rss = process_rss_bytes()
        checks.append(Check("process resident memory", RUNTIME_OVERHEAD_BYTES + mem.edge_model + mem.server_total(),
                            rss, "MiB", None, "runtime + both halves; the unsplit copies loaded stay mapped"))
        if clock == "cpu":
            wire = _mean(link_delay(s.bytes_up, s.bytes_down, link.mbps * 1e6, link.rtt_ms / 1e3) for s in decode)
            compute, how = cpu[best], f"CPU time per decoded token, best of {len(runs)} runs"
        else:
            wire = _median(s.total_s for s in decode) - _median(s.total_s - s.link_s for s in decode)
            compute, how = _median(s.total_s - s.link_s for s in decode), \
                f"median of {len(decode)} steps, best of {len(runs)} runs"
        checks += [
            Check("per-token latency (this machine)", lat.token_s, compute + wire, "ms", LATENCY_TOLERANCE,
                  f"{how}; link emulated"),
            Check("per-token compute (no link)", lat.token_s - lat.transfer_s - lat.rtt_s, compute, "ms", None),
        ]
        if eval_ids is not None:
            from ..eval import compare

            reference = load()
            n = int(eval_ids.shape[-1]) // eval_context * eval_context
            if n == 0:
                raise ValueError(f"eval_ids must hold at least eval_context={eval_context} tokens")
            q = compare(reference, split, eval_ids.reshape(-1)[:n], context=eval_context, stride=eval_context)
            p = plan.predicted
            if "kl" in p:
                checks.append(Check("KL divergence", p["kl"], q.kl, "nats", None, f"{q.tokens} scored tokens"))
                checks.append(Check("perplexity change", p["ppl_change"], q.ppl_change, "%", None))
    finally:
        split.close()
    info = {"model": shape.name, "dtype": plan.dtype, "wire_dtype": plan.wire_dtype, "split_layer": plan.split_layer,
            "codec": codec_text(plan.codec), "max_seq_len": plan.max_seq_len, "prompt_tokens": plan.prompt_tokens,
            "new_tokens": len(decode), "link": str(link), "profile_machine": profile.get("machine"),
            "threads": torch.get_num_threads(), "clock": clock}
    return Verification(checks, info)


def _median(values) -> float:
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@torch.inference_mode()
def _edge_prefill_peak(split, prompt_ids: torch.Tensor) -> int:
    """Peak live tensor bytes of the edge's prefill of ``prompt_ids`` with a fresh cache, less the
    KV cache the prefill leaves (counted as KV cache, not as activations)."""
    from ..models import cache_nbytes

    edge = split.edge
    cache = edge.new_cache()
    with PeakTensorBytes() as peak:
        edge.forward(prompt_ids, cache, 0)
    return peak.peak - cache_nbytes(cache)
