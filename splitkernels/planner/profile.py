"""Measure per-layer compute and codec times on the machine at hand (``splitkernels profile``).

The model runs its ordinary Hugging Face forward (prefill, then cached decode steps) with
timing hooks on every decoder layer and on the LM head, once per weight format. The result is a
JSON profile that :class:`Profile` turns into a :class:`~splitkernels.planner.costs.ComputeModel`
for the optimiser, in place of the roofline model.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .. import backends
from ..codec import CodecConfig, decode, encode, from_bytes
from ..nn import QuantConfig
from ..opsc import apply_opsc, decoder_layers

PROFILE_VERSION = 1
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def format_name(quant: QuantConfig | None) -> str:
    """Profile key of a weight format: ``"dense"`` or ``"<bits>-bit g<group>"``."""
    return "dense" if quant is None else f"{quant.bits}-bit g{quant.group_size}"


@contextmanager
def _layer_timers(model: nn.Module, sink: dict[str, list[float]], clock: Callable[[], float]) -> Iterator[None]:
    """Wall time of every decoder layer call (``sink['layer']``) and LM head call (``sink['head']``)."""
    start: dict[int, float] = {}
    handles = []

    def pre(module, _args):
        start[id(module)] = clock()

    def post(kind):
        def hook(module, _args, _out):
            sink[kind].append(clock() - start[id(module)])
        return hook

    head = model.get_output_embeddings()
    for module, kind in [(layer, "layer") for layer in decoder_layers(model)] + [(head, "head")]:
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post(kind)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def measure_forward(model: nn.Module, prompt_tokens: int, decode_steps: int, repeats: int,
                    clock: Callable[[], float] = time.perf_counter) -> dict:
    """One weight format's entry of a profile: per-layer prefill/decode times, LM head times and
    the time a forward spends outside them, best of ``repeats``, for ``model`` as it is, read
    from ``clock``."""
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=gen)
    layers = len(decoder_layers(model))
    best = {k: float("inf") for k in ("prefill_layer_s", "decode_layer_s", "prefill_head_s", "decode_head_s",
                                      "prefill_other_s", "decode_other_s")}
    for _ in range(repeats):
        sink = {"layer": [], "head": []}
        calls = []
        with _layer_timers(model, sink, clock):
            t0 = clock()
            out = model(ids, use_cache=True)
            calls.append(clock() - t0)
            cache = out.cache
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(decode_steps):
                t0 = clock()
                out = model(nxt, cache=cache, use_cache=True)
                calls.append(clock() - t0)
                cache = out.cache
                nxt = out.logits[:, -1:].argmax(-1)
        prefill = sink["layer"][:layers]
        dec = sink["layer"][layers:]
        # What a forward spends outside its decoder layers and head: embedding, positions, masks,
        # the cache and the framework's own bookkeeping -- per call, whatever the model's size.
        other_p = calls[0] - sum(prefill) - sink["head"][0]
        other_d = (sum(calls[1:]) - sum(dec) - sum(sink["head"][1:])) / max(decode_steps, 1)
        for key, value in (("prefill_layer_s", sum(prefill) / layers), ("decode_layer_s", sum(dec) / max(len(dec), 1)),
                           ("prefill_head_s", sink["head"][0]),
                           ("decode_head_s", sum(sink["head"][1:]) / max(decode_steps, 1)),
                           ("prefill_other_s", max(other_p, 0.0)), ("decode_other_s", max(other_d, 0.0))):
            best[key] = min(best[key], value)
    return best


def _time(fn: Callable[[], object], repeats: int, clock: Callable[[], float]) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def measure_profile(
    model: nn.Module,
    formats: list[QuantConfig | None],
    prompt_tokens: int = 128,
    decode_steps: int = 16,
    repeats: int = 2,
    codec: CodecConfig | None = None,
    name: str = "model",
    wire_dtype: torch.dtype | None = None,
    clock: str = "wall",
) -> dict:
    """Measure per-layer prefill/decode times for each weight format and the codec's encode/decode.

    Times are the best of ``repeats`` runs (the least disturbed by other load). Decode times are
    averages over ``decode_steps`` steps at contexts ``prompt_tokens..prompt_tokens+steps``.
    ``model`` is not modified (each quantised format runs on a copy). Codec times are of whole
    wire frames (encode to bytes; parse and decode) of ``wire_dtype`` values (default: the model's).
    ``clock``: ``"wall"`` (elapsed time) or ``"cpu"`` (this process's CPU time: on a machine
    shared with other work, what the machine alone would take, for single-threaded runs).
    """
    if prompt_tokens < 1 or decode_steps < 1 or repeats < 1:
        raise ValueError("prompt_tokens, decode_steps and repeats must all be >= 1")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    timer = CLOCKS[clock]
    formats_out = {}
    n_layers = len(decoder_layers(model))
    for quant in formats:
        m = model
        if quant is not None:
            m = copy.deepcopy(model)
            apply_opsc(m, n_layers, quant, None)
        formats_out[format_name(quant)] = measure_forward(m, prompt_tokens, decode_steps, repeats, timer)
    hidden = model.get_input_embeddings().embedding_dim
    codec = codec or CodecConfig()
    gen = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    codec_out = {}
    for t in (1, prompt_tokens):
        x = torch.randn(t, hidden, generator=gen).to(wire_dtype or dtype)
        start = 0 if t > 1 else prompt_tokens  # a prompt frame, or a decode step after the prompt
        frame = encode(x, codec, start=start).to_bytes()
        # What the runtime does per frame: encode to wire bytes; parse (CRC and limits) and decode.
        codec_out[str(t)] = {
            "encode_s": _time(lambda x=x, start=start: encode(x, codec, start=start).to_bytes(), repeats, timer),
            "decode_s": _time(lambda frame=frame: decode(from_bytes(frame)), repeats, timer),
        }
    return {
        "version": PROFILE_VERSION,
        "name": name,
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "clock": clock,
        "dtype": str(dtype).replace("torch.", ""),
        "backends": sorted(n for n, b in backends().items() if b["available"]),
        "prompt_tokens": prompt_tokens,
        "decode_steps": decode_steps,
        "formats": formats_out,
        "codec": {"config": codec.to_dict(), "frames": codec_out},
    }


class Profile:
    """A measured profile as a compute model: layer and head times scale linearly with the number
    of prompt tokens around the measured prompt length; decode times are per step."""

    def __init__(self, data: dict) -> None:
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(f"profile version {data.get('version')!r} is not supported (expected {PROFILE_VERSION})")
        self.data = data
        self.prompt_tokens = int(data["prompt_tokens"])

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        with open(path) as f:
            return cls(json.load(f))

    def _format(self, quant: QuantConfig | None) -> dict:
        key = format_name(quant)
        formats = self.data["formats"]
        if key not in formats:
            raise ValueError(f"the profile has no measurement for weight format {key!r}; measured: {sorted(formats)}")
        return formats[key]

    def has(self, quant: QuantConfig | None) -> bool:
        return format_name(quant) in self.data["formats"]

    def layer_s(self, quant: QuantConfig | None, tokens: int, context: int) -> float:
        f = self._format(quant)
        if tokens == 1:
            return f["decode_layer_s"]
        return f["prefill_layer_s"] * tokens / self.prompt_tokens

    def head_s(self, tokens: int) -> float:
        # The head stays dense in every format (OPSC quantises decoder layers only): any entry will do.
        f = next(iter(self.data["formats"].values()))
        return f["decode_head_s"] if tokens == 1 else f["prefill_head_s"] * tokens / self.prompt_tokens

    def call_s(self, tokens: int) -> float:
        """Time one forward call spends outside its layers and head (profiles from before this
        was measured: 0)."""
        f = next(iter(self.data["formats"].values()))
        key = "decode_other_s" if tokens == 1 else "prefill_other_s"
        return f.get(key, 0.0)

    def _codec(self, which: str, tokens: int) -> float:
        frames = self.data["codec"]["frames"]
        one = frames["1"][which]
        if tokens == 1:
            return one
        big = frames[str(self.prompt_tokens)][which]
        return one + (big - one) * (tokens - 1) / max(self.prompt_tokens - 1, 1)

    def encode_s(self, tokens: int) -> float:
        return self._codec("encode_s", tokens)

    def decode_s(self, tokens: int) -> float:
        return self._codec("decode_s", tokens)
