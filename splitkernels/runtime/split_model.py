"""``split_model()``: cut a Hugging Face decoder-only model after layer ``l`` into an edge and a
server segment joined by the activation codec, and generate through them."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..codec import CodecConfig, CodecConfigV2, decode, encode, from_bytes
from ..codec.frame_v2 import FRAME_CODERS
from ..codec.predict import table_for
from ..codec.rate import session_encoder
from ..codec.wire_dtype import WIRE_DTYPES, to_wire
from ..nn import QuantConfig
from ..nn.config import check_opsc_sides
from ..models.split import Adapter, adapter_for
from .metrics import GenerationMetrics, StepMetrics
from .protocol import FINGERPRINT_BYTES, Open, ProtocolError, SamplingParams
from .segments import Edge, Server, cache_nbytes
from .sessions import Limits, SessionManager
from .transport import InProcessTransport, Transport


def model_fingerprint(adapter: Adapter, split_layer: int) -> bytes:
    """16 bytes that identify the model (architecture and a sample of its embedding weights) and
    the split point, so a server refuses an edge running something else.

    Taken before OPSC so both sides agree whatever precision each stores its half in.
    """
    shape = {"model_type": adapter.config.model_type, "hidden": adapter.hidden_size, "layers": adapter.num_layers,
             "vocab": adapter.vocab_size, "split": split_layer}
    h = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    weight = adapter.model.get_input_embeddings().weight
    h.update(weight.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.digest()[:FINGERPRINT_BYTES]


def _opsc_configs(opsc: Any) -> tuple[Any, Any]:
    if opsc is None:
        return None, None
    if isinstance(opsc, dict):
        return opsc.get("front"), opsc.get("back")
    if isinstance(opsc, (tuple, list)) and len(opsc) == 2:
        return opsc[0], opsc[1]
    if hasattr(opsc, "front") and hasattr(opsc, "back"):
        return opsc.front, opsc.back
    raise TypeError("opsc must be None, a (front, back) pair of QuantConfig|None, a dict with 'front'/'back', "
                    f"or an object with .front/.back; got {type(opsc).__name__}")


@dataclass(frozen=True)
class SplitConfig:
    """Where to cut and how to store and send each half, as data.

    * ``split_layer``: the edge keeps decoder layers ``1..split_layer`` (1 <= it < the model's depth).
    * ``codec``: activation codec for the split-layer hidden state: a v1 :class:`CodecConfig`, a
      calibrated v2 :class:`CodecConfigV2` (sent once per session in OPEN), or None (lossless).
    * ``front`` / ``back``: OPSC weight formats of the edge / server layers (None = dense).
    * ``quantize_embedding``: also store the input embedding at ``front`` (OPSC).
    * ``wire_dtype``: dtype the edge casts the hidden state to before the codec (None = the
      edge's compute dtype); an fp32 model sends fp16 or bf16 when a plan says so.
    * ``coder``: symbol coder of v2 frames: None or "rans" (the fewest bytes), "auto" (the Rice
      coder for long prefill frames whose tables suit it: ~0.1 bit per element more, 2-3x faster,
      worth it on links above ~50 Mbit/s), "rice" (every frame of several tokens), "planes" (the
      same codes in bit planes: up to ~1.3x faster again where both ends have AVX-512 VBMI2),
      "slots" (frames of several tokens: ~0.2 bit more than "rice", a fixed-width slot per channel,
      1.2-2x faster than "planes" with AVX-512 VBMI2 + GFNI, about "rice"'s speed on AVX2) or
      "nibble" (every frame: ~0.4 bit more, fixed 4-bit slots).
    * ``rate_control``: with a v2 codec that carries a rate policy (``calibrate``'s default rule),
      the edge picks each frame's step scale so that frames cost the policy's bits on whatever
      text a session sends (:mod:`splitkernels.codec.rate`); False sends every frame at the
      calibrated step (frames then match a teacher-forced pass's exactly).
    """

    split_layer: int
    codec: CodecConfig | CodecConfigV2 | None = None
    front: QuantConfig | None = None
    back: QuantConfig | None = None
    quantize_embedding: bool = False
    wire_dtype: torch.dtype | None = None
    coder: str | None = None
    rate_control: bool = True

    def __post_init__(self) -> None:
        l = self.split_layer
        if isinstance(l, bool) or not isinstance(l, int) or l < 1:
            raise ValueError(f"split_layer must be an int >= 1 (the edge keeps layers 1..split_layer), got {l!r}")
        if self.codec is not None and not isinstance(self.codec, (CodecConfig, CodecConfigV2)):
            raise TypeError(f"codec must be a CodecConfig, a CodecConfigV2 or None, got {type(self.codec).__name__}")
        check_opsc_sides(self.front, self.back, self.quantize_embedding)
        if not isinstance(self.rate_control, bool):
            raise TypeError(f"rate_control must be a bool, got {type(self.rate_control).__name__}")
        if self.wire_dtype is not None and self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be None or one of {[str(d) for d in WIRE_DTYPES]}, got {self.wire_dtype!r}")
        if self.coder not in (None, *FRAME_CODERS):
            raise ValueError(f"coder must be None or one of {list(FRAME_CODERS)}, got {self.coder!r}")
        if self.coder not in (None, "rans") and not isinstance(self.codec, CodecConfigV2):
            raise ValueError(f"coder {self.coder!r} needs a v2 codec (CodecConfigV2), got "
                             f"{type(self.codec).__name__ if self.codec is not None else 'none (lossless)'}")

    @classmethod
    def from_legacy(cls, split_layer: int, codec: CodecConfig | CodecConfigV2 | None = None,
                    opsc: Any = None) -> SplitConfig:
        """From the older ``split_model(model, split_layer, codec=, opsc=)`` arguments."""
        front, back = _opsc_configs(opsc)
        return cls(split_layer, codec, front, back)


def _apply_opsc(model: nn.Module, config: SplitConfig, calibration: torch.Tensor | None) -> None:
    try:
        from ..opsc import apply_opsc
    except ImportError as exc:
        raise RuntimeError("opsc needs splitkernels.opsc (one-point split compression), "
                           f"which this build lacks: {exc}") from exc
    apply_opsc(model, config.split_layer, front=config.front, back=config.back,
               quantize_embedding=config.quantize_embedding, calibration=calibration)


@dataclass
class GenerationResult:
    """Token ids ``[1, prompt + new]`` (as a model's ``generate`` returns them) and the metrics."""

    sequences: torch.Tensor
    metrics: GenerationMetrics

    @property
    def new_tokens(self) -> list[int]:
        return self.sequences[0, self.metrics.steps[0].tokens:].tolist() if self.metrics.steps else []


def _check_input_ids(input_ids: torch.Tensor, vocab: int | None) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("input_ids must be an int64 (or int32) tensor of token ids")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [T] or [1, T] (one sequence), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one token")
    if vocab is not None and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise ValueError(f"input_ids must be in [0, {vocab})")
    return input_ids.long().cpu()


def _eos_set(eos_token_id: int | Sequence[int] | None) -> frozenset[int]:
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int) and not isinstance(eos_token_id, bool):
        return frozenset((eos_token_id,))
    if isinstance(eos_token_id, (list, tuple)) and all(isinstance(e, int) for e in eos_token_id):
        return frozenset(eos_token_id)
    raise TypeError(f"eos_token_id must be None, an int or a list of ints, got {eos_token_id!r}")


def codec_table(codec: CodecConfig | CodecConfigV2, model: nn.Module) -> torch.Tensor | None:
    """The input embedding table a v2 codec's token prediction codes with, checked against
    ``model``'s (ValueError when it does not hold it); None for a codec without a prediction."""
    return table_for(codec.prediction, model) if isinstance(codec, CodecConfigV2) else None


def open_request(sampling: SamplingParams, fingerprint: bytes, seq_len: int,
                 codec: CodecConfig | CodecConfigV2) -> Open:
    """The OPEN of a session; a v2 codec's static config travels in it, once per session."""
    config = codec.canonical_bytes() if isinstance(codec, CodecConfigV2) else b""
    return Open(sampling, fingerprint, seq_len, codec_config=config)


def generate_split(edge: Edge, transport: Transport, input_ids: torch.Tensor, max_new_tokens: int,
                   codec: CodecConfig | CodecConfigV2, sampling: SamplingParams, eos_token_id: int | Sequence[int] | None = None,
                   fingerprint: bytes = bytes(FINGERPRINT_BYTES),
                   wire_dtype: torch.dtype | None = None, coder: str | None = None,
                   rate_control: bool = True) -> GenerationResult:
    """Run one generation: the edge segment here, the server behind ``transport``.

    The prompt's split-layer hidden states go in one frame, then one frame per new token; the
    server replies with each token id. Stops after ``max_new_tokens`` or at an EOS token (kept).
    Hidden states travel in ``wire_dtype`` (None: the edge's dtype); v2 frames are coded with
    ``coder``, under the codec's rate policy unless ``rate_control`` is False (:class:`SplitConfig`).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    vocab = edge.adapter.vocab_size
    ids = _check_input_ids(input_ids, vocab)
    eos = _eos_set(eos_token_id)
    table = codec_table(codec, edge.adapter.model)
    # The last new token is never fed back, so the server sees prompt + new - 1 positions; it refuses
    # the session at OPEN (RESOURCE_EXHAUSTED) when that exceeds its limit.
    seq_len = ids.shape[1] + max_new_tokens - 1
    metrics = GenerationMetrics(hidden_size=edge.adapter.hidden_size)
    tokens: list[int] = []
    virtual = 0.0  # link time an emulator reported without waiting
    start = time.perf_counter()
    session = transport.open(open_request(sampling, fingerprint, seq_len, codec))
    encode_step = session_encoder(codec, rate_control, wire_dtype)
    try:
        cache = edge.new_decode_cache()
        step_ids, position = ids, 0
        for seq in range(max_new_tokens):
            t0 = time.perf_counter()
            hidden = edge.forward(step_ids, cache, position)
            t1 = time.perf_counter()
            frame = encode_step(hidden, coder, position, step_ids[0], table)
            t2 = time.perf_counter()
            ex = session.step(seq, frame)
            t3 = time.perf_counter()
            r = ex.reply
            link = max(t3 - t2 - r.decode_s - r.compute_s, 0.0) + ex.virtual_link_s
            metrics.steps.append(StepMetrics(
                tokens=step_ids.shape[1], edge_compute_s=t1 - t0, encode_s=t2 - t1, frame_bytes=len(frame),
                bytes_up=ex.bytes_up, bytes_down=ex.bytes_down, link_s=link, decode_s=r.decode_s,
                server_compute_s=r.compute_s, total_s=t3 - t0 + ex.virtual_link_s))
            virtual += ex.virtual_link_s
            if seq == 0:
                metrics.ttft_s = t3 - start + virtual
            position += step_ids.shape[1]
            if vocab is not None and not 0 <= r.token < vocab:
                raise ProtocolError(f"server sent token id {r.token}, outside the vocabulary of {vocab}")
            tokens.append(r.token)
            metrics.server_kv_bytes = r.kv_bytes
            if r.token in eos:
                break
            step_ids = torch.tensor([[r.token]], dtype=torch.long)
        metrics.edge_kv_bytes = cache_nbytes(cache)
    finally:
        session.close()
    metrics.total_s = time.perf_counter() - start + virtual
    return GenerationResult(torch.cat([ids, torch.tensor([tokens], dtype=torch.long)], dim=1), metrics)


# What a process builds: both halves (in-process generation) or one of them.
SIDES = ("both", "edge", "server")

class SplitModel:
    """A model cut after ``split_layer``: :class:`Edge` + codec + :class:`Server`.

    ``generate`` talks to its own in-process server (or to ``transport=`` any other, e.g. gRPC);
    calling the object runs a teacher-forced forward through edge -> codec -> server for
    quality evaluation. ``calibration``: token ids for a side with ``method="gptq"``
    (:func:`splitkernels.opsc.apply_opsc`).

    ``fast`` (default True): each segment whose layers the native decode step covers runs
    one-token steps natively (:mod:`splitkernels.fastpath`; ``edge.fast_reason`` /
    ``server.fast_reason`` say why a segment stays eager; an eager server still takes its tokens
    from the native LM head where ``server.head_reason`` is None); False forces the eager path.
    ``fast_head``: the server's LM head on the fast path, ``"int8"`` (per-row int8 weights) or
    ``"fp32"`` (the model's own weights). ``side``: ``"both"`` halves (in-process generation),
    or the one half this process runs, ``"edge"`` or ``"server"``: the other is never built (an
    edge process holds no server layers, native path or int8 head) and its layers are freed, as
    :meth:`release` does.
    """

    def __init__(self, model: nn.Module, split_layer: int | SplitConfig,
                 codec: CodecConfig | CodecConfigV2 | None = None, opsc: Any = None,
                 limits: Limits | None = None, fast: bool = True, fast_head: str = "int8", *,
                 calibration: torch.Tensor | None = None, side: str = "both") -> None:
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        config = split_layer if isinstance(split_layer, SplitConfig) else SplitConfig.from_legacy(split_layer, codec, opsc)
        if isinstance(split_layer, SplitConfig) and (codec is not None or opsc is not None):
            raise TypeError("pass codec and OPSC settings inside the SplitConfig, not beside it")
        adapter = adapter_for(model)
        if not config.split_layer < adapter.num_layers:
            raise ValueError(f"split_layer must be an int in [1, {adapter.num_layers - 1}] "
                             f"(the edge keeps layers 1..split_layer), got {config.split_layer!r}")
        self.config = config
        self.model = model
        self.split_layer = config.split_layer
        self.codec = config.codec or CodecConfig.passthrough()
        self.fingerprint = model_fingerprint(adapter, self.split_layer)
        if isinstance(self.codec, CodecConfigV2) and self.codec.d != adapter.hidden_size:
            raise ValueError(f"codec is a CodecConfigV2 for d = {self.codec.d}, the model's hidden size is "
                             f"{adapter.hidden_size}")
        if config.front is not None or config.back is not None:
            _apply_opsc(model, config, calibration)
            adapter = adapter_for(model)
        self.adapter = adapter
        self._table = codec_table(self.codec, model)  # after OPSC: a quantised embedding cannot predict
        self.edge: Edge | None = None
        self.server: Server | None = None
        self.manager: SessionManager | None = None
        self.transport: Transport | None = None
        self.last_metrics: GenerationMetrics | None = None
        # The half not run is dropped after the other is built (the layer lookup needs all layers).
        if side != "server":
            self.edge = Edge(adapter, self.split_layer, fast)
        if side != "edge":
            self.server = Server(adapter, self.split_layer, fast, fast_head)
            self.manager = SessionManager(self.server, limits, self.fingerprint)
            self.transport = InProcessTransport(self.manager)
        if side != "both":
            self.release("server" if side == "edge" else "edge")

    def run(self, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
            top_k: int = 0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
            seed: int | None = None, transport: Transport | None = None) -> GenerationResult:
        """Generate and return ids and metrics (see :meth:`generate`)."""
        sampling = SamplingParams(bool(do_sample), float(temperature), top_k, float(top_p), seed)
        result = generate_split(self._require("edge"), transport or self._require("transport"), input_ids,
                                max_new_tokens, self.codec, sampling, eos_token_id, self.fingerprint,
                                self.config.wire_dtype, self.config.coder, self.config.rate_control)
        self.last_metrics = result.metrics
        return result

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | Sequence[int] | None = None, seed: int | None = None,
                 transport: Transport | None = None) -> torch.Tensor:
        """Prompt + generated ids ``[1, T + n]``; greedy unless ``do_sample``.

        With the lossless codec, greedy output equals the unsplit model's ``generate`` token for
        token. Metrics of the run are left in :attr:`last_metrics`.
        """
        return self.run(input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, seed,
                        transport).sequences

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``[1, T, V]``: edge, codec frame (through its bytes), server; no cache."""
        ids = _check_input_ids(input_ids, self.adapter.vocab_size)
        hidden = self._require("edge").forward(ids, None, 0)
        config = self.codec if isinstance(self.codec, CodecConfigV2) else None
        wire = to_wire(hidden, self.config.wire_dtype)
        frame = encode(wire, self.codec, tokens=ids[0], embedding=self._table).to_bytes()
        hidden = decode(from_bytes(frame, config), embedding=self._table).to(hidden.device)
        return self._require("server").forward(hidden, None, 0, last_only=False)

    def release(self, side: str) -> None:
        """Free the decoder layers of the half this process does not run: ``"edge"`` (a server
        process) or ``"server"`` (an edge process, which then generates only with ``transport=``).
        Modules both halves share, such as an embedding tied to the LM head, stay."""
        if side == "edge":
            self.adapter.drop_layers(0, self.split_layer)
            self.edge = None
        elif side == "server":
            if self.manager is not None:
                self.manager.shutdown()
            self.adapter.drop_layers(self.split_layer, self.adapter.num_layers)
            self.server = self.manager = self.transport = None
        else:
            raise ValueError(f"side must be 'edge' or 'server', got {side!r}")

    def _require(self, part: str):
        value = getattr(self, part)
        if value is None:
            half = "edge" if part == "edge" else "server"
            hint = "; pass transport= to reach a remote server" if part == "transport" else ""
            raise RuntimeError(f"this SplitModel released its {half} half (see release()){hint}")
        return value

    def close(self) -> None:
        """Free the in-process server's sessions."""
        if self.manager is not None:
            self.manager.shutdown()


def split_model(model: nn.Module, split_layer: int | SplitConfig, codec: CodecConfig | CodecConfigV2 | None = None,
                opsc: Any = None, limits: Limits | None = None, fast: bool = True, fast_head: str = "int8", *,
                calibration: torch.Tensor | None = None, side: str = "both") -> SplitModel:
    """Split ``model`` (a Hugging Face decoder-only ``*ForCausalLM`` of any family) after a decoder layer.

    ``split_layer`` is a :class:`SplitConfig` (split layer, codec, OPSC formats), or, in the older
    form, the split layer with ``codec`` (None = lossless) and ``opsc`` (None, or ``(front,
    back)`` :class:`splitkernels.nn.QuantConfig`, either may be None) beside it. OPSC is applied
    to ``model`` in place; a side with ``method="gptq"`` is calibrated on ``calibration`` token
    ids (text disjoint from what is evaluated). ``limits``: limits of the built-in in-process server.
    ``fast`` / ``fast_head``: the native decode path; ``side``: the half or halves this process
    builds (see :class:`SplitModel`).
    """
    return SplitModel(model, split_layer, codec, opsc, limits, fast, fast_head, calibration=calibration, side=side)
