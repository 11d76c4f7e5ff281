"""Cost models of a split deployment: memory per side and latency per token / to first token.

Memory follows the public OPSC equation ``M(l, Qw) = sum_{i<=l} Bw(i; Qw1) + sum_{j>l} Bw(j; Qw2)``
with ``Bw`` the packed weight bytes *including* scales and zeros, plus the KV cache of each side
at the maximum sequence length ``w_max`` and the working buffers of a prompt of ``w_max`` tokens.

Latency per generated token:

    edge compute(l) + encode + frame bytes / bandwidth + RTT + decode + server compute(l)

and time to first token the same with the whole prompt in one frame. Compute times come from a
:class:`Roofline` over a :class:`~splitkernels.planner.devices.Device` or from a
:class:`~splitkernels.planner.profile.Profile` measured on the machine at hand.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..codec import frame_center
from ..codec.config_v2 import band_shifts, shift_end_of
from ..codec.frame import frame_nbytes
from ..codec.frame_v2 import framing_bytes, rans_coder, rans_stream_lanes, residual_bytes
from ..models.shape import ModelShape
from ..nn import QuantConfig
from ..nn.config import SCALE_DTYPES
from .devices import Device


def linear_weight_bytes(out_features: int, in_features: int, quant: QuantConfig | None, dtype_bytes: int = 2) -> int:
    """Stored bytes of one linear weight: packed int32 words plus scale and zero (FORMATS §2)."""
    if quant is None:
        return out_features * in_features * dtype_bytes
    g = quant.group_size_for(in_features)
    words = (in_features * quant.bits + 31) // 32
    if quant.scale_dtype is not None:
        dtype_bytes = SCALE_DTYPES[quant.scale_dtype].itemsize
    return out_features * (4 * words + 2 * dtype_bytes * (in_features // g))


def layer_weight_bytes(shape: ModelShape, quant: QuantConfig | None) -> int:
    """Bytes of one decoder layer's weights at ``quant`` (norms and biases stay dense)."""
    return sum(linear_weight_bytes(n, k, quant, shape.dtype_bytes) for n, k in shape.linears) + \
        shape.layer_other_params * shape.dtype_bytes


def working_bytes(shape: ModelShape, tokens: int, context: int) -> int:
    """Activation buffers of one forward of ``tokens`` tokens attending to ``context`` positions.

    At the peak of a decoder layer (its MLP) a forward holds the residual stream, the normed input
    and two more hidden-wide tensors (about 4 * hidden), three intermediate-wide tensors in a
    gated MLP (the activated gate, the up projection and their product; two in a plain one) and
    the rotary cos/sin tables (2 *
    head_dim) -- the peak of live tensor bytes measured on Llama- and OPT-family forwards
    (splitkernels.planner.verify) -- plus eager attention scores in fp32 (heads * tokens *
    context), which a fused attention (SDPA) does not materialise, so they are an upper estimate.
    """
    inter = max((n for n, _ in shape.linears), default=shape.hidden)  # a layer may have no nn.Linear
    # A gated MLP (two projections up to the intermediate width) holds three intermediate-wide
    # tensors at its peak; a plain one (fc1, activation, fc2) two.
    wide = 3 if sum(n == inter for n, _ in shape.linears) >= 2 else 2
    acts = tokens * (4 * shape.hidden + wide * inter + 2 * shape.head_dim) * shape.dtype_bytes
    scores = shape.num_heads * tokens * context * 4
    return acts + scores


# Resident memory of this runtime before any real model weights: Python, torch, transformers and
# splitkernels with the code a first split generation loads lazily, and their allocator arenas.
# Measured with process_rss_bytes on the 2-core x86-64 development VM (CPU torch 2.13, 2026-11-30):
# 240 MiB after the imports, 435 MiB after one split generation of a tiny model. A device runtime
# (a C++ server, a trimmed build) keeps less; this is the figure for this one.
RUNTIME_OVERHEAD_BYTES = 440 * 2**20


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per side. ``server_session`` is what each extra session adds on the server.

    ``edge_embedding`` is the part of ``edge_weights`` held before the first layer (the token
    embedding); ``edge_working`` holds the activations of the larger of a prefill of
    ``prompt_tokens`` tokens and a one-token decode step at ``max_seq_len`` positions;
    ``edge_overhead`` is the runtime's own resident memory (:data:`RUNTIME_OVERHEAD_BYTES`).
    """

    edge_weights: int
    edge_kv: int
    edge_working: int
    server_weights: int
    server_session: int
    server_working: int
    edge_embedding: int = 0
    edge_overhead: int = 0
    prompt_tokens: int = 0
    max_seq_len: int = 0

    @property
    def edge_model(self) -> int:
        """What the model itself needs on the edge: weights, KV cache and activations."""
        return self.edge_weights + self.edge_kv + self.edge_working

    @property
    def edge_total(self) -> int:
        return self.edge_model + self.edge_overhead

    def server_total(self, sessions: int = 1) -> int:
        return self.server_weights + sessions * self.server_session + self.server_working

    def breakdown(self) -> dict[str, int]:
        """Edge bytes by kind, the parts of :attr:`edge_total`."""
        return {"embedding": self.edge_embedding, "layer_weights": self.edge_weights - self.edge_embedding,
                "kv_cache": self.edge_kv, "activations": self.edge_working, "runtime_overhead": self.edge_overhead}


def memory(shape: ModelShape, split_layer: int, front: QuantConfig | None, back: QuantConfig | None,
           max_seq_len: int, prompt_tokens: int | None = None,
           overhead_bytes: int = RUNTIME_OVERHEAD_BYTES) -> MemoryEstimate:
    """Memory of each side for a split after ``split_layer`` layers and contexts up to ``max_seq_len``.

    The edge holds the (dense) token embedding and layers ``1..l``; the server holds layers
    ``l+1..L``, the final norm and the LM head (its own copy when the head is tied to the embedding);
    position embeddings, where a model learns them, on both.
    Working buffers are those of one forward of a ``prompt_tokens``-token prompt (default: the
    whole ``max_seq_len`` in one forward, the upper bound) or of one decode step at
    ``max_seq_len`` positions, whichever is larger: the runtime runs the prompt in one forward,
    then one token at a time.
    """
    _check_split(shape, split_layer)
    prompt = max_seq_len if prompt_tokens is None else min(int(prompt_tokens), max_seq_len)
    if prompt < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens!r}")
    emb = shape.vocab * shape.hidden * shape.dtype_bytes
    # Learned position embeddings: both halves hold them; the final norm: the server.
    positions = shape.position_params * shape.dtype_bytes
    edge_w = emb + positions + split_layer * layer_weight_bytes(shape, front)
    server_w = (shape.num_layers - split_layer) * layer_weight_bytes(shape, back) + emb + \
        shape.outer * shape.dtype_bytes
    kv = shape.kv_bytes_per_token_layer * max_seq_len
    work = max(working_bytes(shape, prompt, prompt), working_bytes(shape, 1, max_seq_len))
    # The server also holds the prompt's logits row only for the last position: vocab floats.
    return MemoryEstimate(
        edge_weights=edge_w,
        edge_kv=split_layer * kv,
        edge_working=work,
        server_weights=server_w,
        server_session=(shape.num_layers - split_layer) * kv,
        server_working=work + shape.vocab * 4,
        edge_embedding=emb + positions,
        edge_overhead=overhead_bytes,
        prompt_tokens=prompt,
        max_seq_len=max_seq_len,
    )


def _check_split(shape: ModelShape, split_layer: int) -> None:
    if isinstance(split_layer, bool) or not isinstance(split_layer, int) or not 1 <= split_layer < shape.num_layers:
        raise ValueError(f"split_layer must be an int in [1, {shape.num_layers - 1}], got {split_layer!r}")


class ComputeModel(Protocol):
    """Seconds for the pieces of a forward pass on one machine."""

    def layer_s(self, quant: QuantConfig | None, tokens: int, context: int) -> float:
        """One decoder layer, ``tokens`` new tokens attending to ``context`` positions."""

    def head_s(self, tokens: int) -> float:
        """Final norm and LM head for ``tokens`` positions (at decode only the last is needed)."""

    def encode_s(self, tokens: int) -> float:
        """Codec encode of a ``tokens``-row frame."""

    def decode_s(self, tokens: int) -> float:
        """Codec decode of a ``tokens``-row frame."""


def _call_s(compute: ComputeModel, tokens: int) -> float:
    # A measured Profile knows what one segment call costs besides its layers (embedding,
    # positions, masks, cache bookkeeping); the roofline folds that into layer_overhead_us.
    call = getattr(compute, "call_s", None)
    return call(tokens) if call is not None else 0.0


class Roofline:
    """max(bytes / bandwidth, FLOPs / peak) per layer, plus a fixed launch overhead.

    Bytes are the layer's stored weights (read once per forward), the KV cache read for the
    context, and activations in and out. Low-bit dequantisation is assumed fused into the GEMV,
    as the low-bit kernels do, so it costs no extra memory traffic.
    """

    def __init__(self, device: Device, shape: ModelShape) -> None:
        self.device, self.shape = device, shape

    def _time(self, nbytes: float, flops: float) -> float:
        return max(nbytes / self.device.bytes_per_s, flops / self.device.flops_per_s)

    def layer_s(self, quant: QuantConfig | None, tokens: int, context: int) -> float:
        s = self.shape
        nbytes = layer_weight_bytes(s, quant) + s.kv_bytes_per_token_layer * context + \
            tokens * 6 * s.hidden * s.dtype_bytes
        flops = 2 * tokens * s.layer_params + 4 * tokens * context * s.num_heads * s.head_dim
        return self._time(nbytes, flops) + self.device.layer_overhead_us * 1e-6

    def head_s(self, tokens: int) -> float:
        s = self.shape
        nbytes = s.vocab * s.hidden * s.dtype_bytes + tokens * s.hidden * s.dtype_bytes
        return self._time(nbytes, 2 * tokens * s.vocab * s.hidden) + self.device.layer_overhead_us * 1e-6

    def encode_s(self, tokens: int) -> float:
        # One fused pass: read the hidden state, write codes and outliers (< its size).
        nbytes = 2 * tokens * self.shape.hidden * self.shape.dtype_bytes
        return nbytes / self.device.bytes_per_s + self.device.codec_overhead_us * 1e-6

    decode_s = encode_s


@dataclass(frozen=True)
class Link:
    """A network path: ``mbps`` in 1e6 bit/s, round-trip time in ms."""

    mbps: float
    rtt_ms: float

    def __post_init__(self) -> None:
        if not self.mbps > 0:
            raise ValueError(f"mbps must be > 0, got {self.mbps!r}")
        if not self.rtt_ms >= 0:
            raise ValueError(f"rtt_ms must be >= 0, got {self.rtt_ms!r}")

    def transfer_s(self, nbytes: float) -> float:
        return 8.0 * nbytes / (self.mbps * 1e6)

    def __str__(self) -> str:
        return f"{self.mbps:g} Mbit/s, RTT {self.rtt_ms:g} ms"


# Per message on the wire besides the frame (header 20 B + sequence number 4 B) and the server's
# reply per step (header 20 B + token, position, timings, KV bytes 28 B): exact for the runtime's
# messages (runtime/protocol.py; python_tests/test_planner.py holds them equal). Transport framing
# below them (gRPC/HTTP2, TCP/IP) is not counted, as the runtime's metrics do not count it.
MESSAGE_OVERHEAD_BYTES = 24
REPLY_BYTES = 48


def frame_bytes(tokens: int, hidden: int, code_bits: float, outliers_per_token: float,
                wire_dtype: torch.dtype = torch.float16) -> int:
    """Expected codec frame size for ``tokens`` rows, from the per-token averages of a calibration.

    ``code_bits`` is the mean per-token width (16 = raw fp16 tokens).
    """
    stream = tokens * -(-round(hidden * code_bits) // 8)
    return frame_nbytes(tokens, hidden, wire_dtype, round(outliers_per_token * tokens), stream)


def frame_bytes_v2(tokens: int, hidden: int, code_bits: float, escapes_per_token: float,
                   wire_dtype: torch.dtype = torch.float16, *, position_shift: tuple[int, ...] = (),
                   start: int = 0, id_bits: int = 0) -> int:
    """Expected codec v2 frame size for ``tokens`` rows from position ``start`` (docs/FORMATS.md
    §5.4), from a calibration's per-element symbol bits (``code_bits``, the entropy-coded stream)
    and escapes per token. ``position_shift`` (the config's) adds the residual bits of the frame's
    early rows, so a short prompt costs what its own positions cost, not the calibration's average.
    ``id_bits`` (a config's prediction) adds the token ids; its escapes travel in fp32. Token
    shifts (a few ids below position 128, text-dependent) are not counted: a few hundredths of a
    bit per element of a prompt frame. Frames of ``frame_center.MIN_TOKENS`` or more count the center
    offset section (docs/FORMATS.md §5.4.2), which they carry where the text drifts."""
    escapes = round(escapes_per_token * tokens)
    n = tokens * hidden
    stream = -(-round(n * code_bits) // 8) + 4 * rans_stream_lanes(rans_coder(tokens, hidden), n)
    position_shift = tuple(position_shift)
    shifts = band_shifts(position_shift, start, max(0, min(tokens, shift_end_of(position_shift) - start)))
    residuals = residual_bytes(shifts, np.zeros(len(shifts), dtype=bool), hidden)
    framing = framing_bytes(tokens, escapes, start if residuals else None, id_bits)
    if tokens >= frame_center.MIN_TOKENS:  # counted as if the frame carries center offsets (at most 4 bits a channel)
        framing += frame_center.section_bytes(hidden)
    return framing + escapes * (4 if id_bits else wire_dtype.itemsize) + residuals + stream


@dataclass(frozen=True)
class LatencyEstimate:
    """Seconds per generated token and to first token, with the parts that make them up."""

    edge_s: float
    encode_s: float
    transfer_s: float
    rtt_s: float
    decode_s: float
    server_s: float
    ttft_s: float
    token_bytes: int
    prompt_bytes: int

    @property
    def token_s(self) -> float:
        return self.edge_s + self.encode_s + self.transfer_s + self.rtt_s + self.decode_s + self.server_s

    def breakdown(self) -> dict[str, float]:
        return {"edge": self.edge_s, "encode": self.encode_s, "transfer": self.transfer_s, "rtt": self.rtt_s,
                "decode": self.decode_s, "server": self.server_s}


def split_latency(
    shape: ModelShape,
    edge: ComputeModel,
    server: ComputeModel,
    link: Link,
    split_layer: int,
    front: QuantConfig | None,
    back: QuantConfig | None,
    token_bytes: int,
    prompt_bytes: int,
    prompt_tokens: int,
    context: int,
) -> LatencyEstimate:
    """Latency of a split deployment; per-token figures at ``context`` positions of KV cache
    (the worst case is ``max_seq_len``). ``token_bytes``/``prompt_bytes`` are the frame sizes; the
    estimate's ``token_bytes``/``prompt_bytes`` are both messages of the exchange (request with the
    frame, and the reply)."""
    _check_split(shape, split_layer)
    n_back = shape.num_layers - split_layer
    edge_tok = split_layer * edge.layer_s(front, 1, context) + _call_s(edge, 1)
    server_tok = n_back * server.layer_s(back, 1, context) + server.head_s(1) + _call_s(server, 1)
    enc, dec = edge.encode_s(1), server.decode_s(1)
    token_bytes_total = token_bytes + MESSAGE_OVERHEAD_BYTES
    prompt_bytes_total = prompt_bytes + MESSAGE_OVERHEAD_BYTES
    ttft = (
        _call_s(edge, prompt_tokens) + _call_s(server, prompt_tokens)
        + split_layer * edge.layer_s(front, prompt_tokens, prompt_tokens)
        + edge.encode_s(prompt_tokens)
        + link.transfer_s(prompt_bytes_total + REPLY_BYTES)
        + link.rtt_ms * 1e-3
        + server.decode_s(prompt_tokens)
        + n_back * server.layer_s(back, prompt_tokens, prompt_tokens)
        + server.head_s(1)
    )
    return LatencyEstimate(
        edge_s=edge_tok, encode_s=enc, transfer_s=link.transfer_s(token_bytes_total + REPLY_BYTES),
        rtt_s=link.rtt_ms * 1e-3, decode_s=dec, server_s=server_tok, ttft_s=ttft,
        token_bytes=token_bytes_total + REPLY_BYTES, prompt_bytes=prompt_bytes_total + REPLY_BYTES,
    )


def local_latency(shape: ModelShape, compute: ComputeModel, quant: QuantConfig | None, prompt_tokens: int,
                  context: int) -> tuple[float, float]:
    """(seconds per token, TTFT) of the whole model on one machine (edge-only or the server part of cloud-only)."""
    token = shape.num_layers * compute.layer_s(quant, 1, context) + compute.head_s(1) + _call_s(compute, 1)
    ttft = shape.num_layers * compute.layer_s(quant, prompt_tokens, prompt_tokens) + compute.head_s(1) + \
        _call_s(compute, prompt_tokens)
    return token, ttft
