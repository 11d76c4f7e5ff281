"""Quality model: measured perplexity change and KL divergence per (split layer, front bits, back
bits, codec setting, front quantisation method).

The effect of a split on teacher-forced logits is exact to simulate without the runtime: replace
the hidden state after decoder layer ``l`` by what the server would decode from the wire
(``transform``), and run each segment with its quantised weights. A calibration run
measures that for every point of a small grid on a short text and caches the results in JSON, so
the optimiser never runs the model.

Codec settings in mode ``error`` choose each token's width from that token alone, so the quality
measured on teacher-forced windows is also the quality of token-by-token decoding; so does codec
v2, whose points name a spec (``{"kind": "v2", "bits": ..., "sensitivity": ...}``): the evaluator
calibrates it at each split on its calibration ids (with the point's OPSC weights in place). Mode
``budget`` allocates across the tokens of one frame; at decode time a frame holds one token, so
its measured quality describes prefill frames only.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..codec import CodecConfig, CodecConfigV2, decode, encode, frame_center
from ..codec.frame_v2 import EncodedV2, framing_bytes, rans_coder, rans_stream_lanes, residual_bytes
from ..codec.predict import table_for
from ..codec.spec import config_for_model, is_v2_spec
from ..eval import compare_logits
from ..calibration import quantize_layers
from ..nn import QuantConfig, QuantLinear
from ..opsc import decoder_layers
from ..quant import quantize_weight

QUALITY_TABLE_VERSION = 1
# [T, d] hidden state -> what the server sees, the bytes on the wire and per-token stats
Transform = Callable[[torch.Tensor], "TransferResult"]


@dataclass
class TransferResult:
    """What one hidden-state transfer did: the reconstruction and its wire cost."""

    x_hat: torch.Tensor
    nbytes: int
    code_bits: float = 0.0  # sum over tokens of per-token code width (raw tokens count as raw width)
    outliers: int = 0


def v2_code_bits(enc: EncodedV2, nbytes: int) -> float:
    """The entropy-coded symbol bits per element of a v2 frame of ``nbytes``, summed over its
    tokens (raw tokens at their width): what is left of the frame without framing, escapes, raw
    values, center offsets, residuals and rANS state flushes. :func:`~.costs.frame_bytes_v2` rebuilds ``nbytes``
    from it."""
    t, d = enc.shape
    width = enc.raw_values.element_size()
    n_esc, n_raw = int(enc.escapes.numel()), int(enc.raw.sum())
    coded = (t - n_raw) * d
    shifts = None if enc.start is None else enc.config.row_shifts(enc.start, t, enc.tokens)
    residuals = 0 if shifts is None else residual_bytes(shifts, enc.raw.numpy()[: len(shifts)], d)
    id_bits = 0 if enc.config.prediction is None else enc.config.prediction.id_bits
    offsets = 0 if enc.center_offset is None else frame_center.section_bytes(d)
    stream = nbytes - framing_bytes(t, n_esc, enc.start, id_bits) - offsets - (n_esc + n_raw * d) * width - residuals - \
        (4 * rans_stream_lanes(rans_coder(t, d), coded) if coded else 0)
    return 8.0 * stream / d + n_raw * 8.0 * width


def codec_transform(config: CodecConfig | CodecConfigV2, wire_dtype: torch.dtype = torch.float16,
                    tokens: Callable[[], torch.Tensor | None] | None = None,
                    embedding: torch.Tensor | None = None) -> Transform:
    """Round trip through the codec (v1 TS + TAB-Q, or v2), sending ``wire_dtype`` (what an fp16
    edge sends). For v2, ``code_bits`` is :func:`v2_code_bits` (the residuals of early positions
    left out: the planner adds them per position from the config's ``position_shift``) and
    ``outliers`` counts escapes: what :func:`~.costs.frame_bytes_v2` needs. A v2 config with a
    prediction codes with ``embedding`` (the input embedding table) and the ids ``tokens()``
    gives for the sequence being sent."""

    def run(x: torch.Tensor) -> TransferResult:
        if isinstance(config, CodecConfigV2):
            ids = None if tokens is None else tokens()
            enc = encode(x.to(wire_dtype), config, tokens=ids, embedding=embedding)
            nbytes = len(enc.to_bytes())
            return TransferResult(decode(enc, embedding=embedding).to(x.dtype), nbytes, v2_code_bits(enc, nbytes),
                                  int(enc.escapes.numel()))
        enc = encode(x.to(wire_dtype), config)
        return TransferResult(
            decode(enc).to(x.dtype), enc.nbytes, float(enc.token_bits.double().sum()), int(enc.num_outliers.sum())
        )

    return run


@contextmanager
def split_point(model: nn.Module, split_layer: int, transform: Transform, log: list[TransferResult]) -> Iterator[None]:
    """Within the block, the output of decoder layer ``split_layer`` (1-based) goes through ``transform``.

    Each sequence of the batch is one frame (tokens as rows), as the edge would send a prompt.
    Every transfer is appended to ``log``.
    """
    layers = decoder_layers(model)
    if not 1 <= split_layer < len(layers):
        raise ValueError(f"split_layer must be in [1, {len(layers) - 1}], got {split_layer}")

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        rows = []
        for seq in hidden:
            res = transform(seq)
            log.append(res)
            rows.append(res.x_hat)
        new = torch.stack(rows)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = layers[split_layer - 1].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class SegmentQuantizer:
    """Swaps decoder-layer weights for their group-quantised values: layers ``1..l`` at the
    front width, the rest at the back width (OPSC, docs/DESIGN.md §1).

    The dequantised weights equal what a low-bit kernel multiplies by (up to matmul rounding),
    so quality is measured without the packed kernels. Dequantised copies are cached per
    (layer, bits, method), so sweeping split layers quantises each layer once per width.

    A front with ``method="gptq"`` is calibrated on ``calibration`` token ids over every layer
    but the last (on a copy of the model, once per width): the front of a split at ``l`` is its
    first ``l`` layers, which is what ``apply_opsc`` makes at that split.
    """

    def __init__(self, model: nn.Module, group_size: int = 64, calibration: torch.Tensor | None = None) -> None:
        self.model = model
        self.group_size = group_size
        self.calibration = calibration
        self._cache: dict[tuple[int, int, str], list[torch.Tensor]] = {}

    @staticmethod
    def _linears(layer: nn.Module) -> list[nn.Linear]:
        return [m for m in layer.modules() if isinstance(m, nn.Linear)]

    def _calibrate(self, bits: int, method: str) -> None:
        if self.calibration is None:
            raise ValueError(f"front method {method!r} needs calibration token ids (calibration=...)")
        import copy

        model = copy.deepcopy(self.model)
        layers = decoder_layers(model)
        config = QuantConfig(bits, self.group_size, method=method)
        plan = {i: {name: config for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
                for i, layer in enumerate(layers) if i < len(layers) - 1}
        quantize_layers(model, layers, plan, self.calibration, progress=False)
        for i in plan:
            dtype = next(self.model.parameters()).dtype
            self._cache[(i, bits, method)] = [m.dequantize(dtype)
                                              for m in layers[i].modules() if isinstance(m, QuantLinear)]

    def _quantised(self, index: int, bits: int, method: str = "rtn") -> list[torch.Tensor]:
        if method != "rtn":
            if (index, bits, method) not in self._cache:
                self._calibrate(bits, method)
            return self._cache[(index, bits, method)]
        key = (index, bits, method)
        if key not in self._cache:
            layer = decoder_layers(self.model)[index]
            self._cache[key] = [
                quantize_weight(lin.weight.detach(), bits, QuantConfig(bits, self.group_size).group_size_for(
                    lin.in_features)).dequantize(lin.weight.dtype)
                for lin in self._linears(layer)
            ]
        return self._cache[key]

    @contextmanager
    def segments(self, split_layer: int, front_bits: int | None, back_bits: int | None,
                 front_method: str = "rtn") -> Iterator[None]:
        """Within the block, layers ``1..split_layer`` run at ``front_bits`` (quantised with
        ``front_method``) and the rest at ``back_bits`` (RTN) (``None``: unchanged weights)."""
        layers = decoder_layers(self.model)
        saved = []
        try:
            for i, layer in enumerate(layers):
                bits = front_bits if i < split_layer else back_bits
                if bits is None:
                    continue
                method = front_method if i < split_layer else "rtn"
                for lin, w in zip(self._linears(layer), self._quantised(i, bits, method)):
                    saved.append((lin, lin.weight.data))
                    lin.weight.data = w
            yield
        finally:
            for lin, w in saved:
                lin.weight.data = w


@dataclass
class QualityPoint:
    """One measured configuration. ``ppl_change`` is relative (0.01 = +1%); KL is mean nats/token.
    ``front_method`` is how the front weights were quantised (QuantConfig.method; the back is RTN).
    ``position_shift`` is a v2 point's calibrated per-position-band shift (its early positions'
    residual bits, which ``code_bits`` leaves out); empty for v1 and for tables measured before it
    was recorded, whose ``code_bits`` average the residuals in. ``id_bits``: the width of each
    token id a v2 point's frames carry (its config's token prediction; 0 without)."""

    split_layer: int
    front_bits: int | None
    back_bits: int | None
    codec: dict | None  # CodecConfig.to_dict() or a v2 spec; None = lossless transfer
    ppl_reference: float
    ppl: float
    kl: float
    top1_agreement: float
    bits_per_element: float  # measured frame bits / element at the calibration frame length
    code_bits: float  # mean per-token code width (v2: entropy-coded bits/element); raw tokens at their raw width
    outliers_per_token: float
    tokens: int
    front_method: str = "rtn"
    position_shift: tuple[int, ...] = ()
    id_bits: int = 0

    def __post_init__(self) -> None:
        self.position_shift = tuple(int(s) for s in self.position_shift)  # a JSON list when loaded

    @property
    def ppl_change(self) -> float:
        return self.ppl / self.ppl_reference - 1.0

    def key(self) -> str:
        return point_key(self.split_layer, self.front_bits, self.back_bits, self.codec, self.front_method)


def point_key(split_layer: int, front_bits: int | None, back_bits: int | None,
              codec: dict | CodecConfig | None, front_method: str = "rtn") -> str:
    """Canonical cache key of a calibration point (an RTN point keeps the key tables had before
    the method became a dimension)."""
    if isinstance(codec, CodecConfig):
        codec = codec.to_dict()
    method = [] if front_method == "rtn" else [front_method]
    return json.dumps([split_layer, front_bits, back_bits, codec, *method], sort_keys=True)


@dataclass
class QualityTable:
    """Calibration results plus what they were measured on; JSON-serialisable cache."""

    model: str
    text: str
    context: int
    group_size: int
    points: dict[str, QualityPoint] = field(default_factory=dict)

    def get(self, split_layer: int, front_bits: int | None, back_bits: int | None,
            codec: CodecConfig | dict | None, front_method: str = "rtn") -> QualityPoint | None:
        return self.points.get(point_key(split_layer, front_bits, back_bits, codec, front_method))

    def add(self, point: QualityPoint) -> None:
        self.points[point.key()] = point

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": QUALITY_TABLE_VERSION,
                "model": self.model,
                "text": self.text,
                "context": self.context,
                "group_size": self.group_size,
                "points": [asdict(p) for p in self.points.values()],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> QualityTable:
        d = json.loads(text)
        if d.get("version") != QUALITY_TABLE_VERSION:
            raise ValueError(f"quality table version {d.get('version')!r} is not {QUALITY_TABLE_VERSION}")
        table = cls(d["model"], d["text"], int(d["context"]), int(d["group_size"]))
        for p in d["points"]:
            table.add(QualityPoint(**p))
        return table

    def save(self, path: str | os.PathLike) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> QualityTable:
        with open(path) as f:
            return cls.from_json(f.read())


class SplitEvaluator:
    """Scores split configurations against the unsplit model on fixed windows of a text.

    The text is cut into non-overlapping windows of ``context`` tokens (every token but each
    window's first is scored). Reference logits are computed once; each :meth:`measure` call
    runs the model with both segments quantised and the split-point transform in place, and
    compares with :func:`splitkernels.eval.compare_logits`.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, context: int, group_size: int = 64,
                 calibration: torch.Tensor | None = None, wire_dtype: torch.dtype = torch.float16) -> None:
        if input_ids.ndim == 2:
            if input_ids.shape[0] != 1:
                raise ValueError(f"input_ids must be one sequence, got batch {input_ids.shape[0]}")
            input_ids = input_ids[0]
        if isinstance(context, bool) or not isinstance(context, int) or context < 2:
            raise ValueError(f"context must be an int >= 2, got {context!r}")
        n = input_ids.shape[0] // context
        if n == 0:
            raise ValueError(f"input_ids must hold at least one window of context={context} tokens, "
                             f"got {input_ids.shape[0]}")
        self.model = model
        self.current_ids: torch.Tensor | None = None
        self.windows = input_ids[: n * context].reshape(n, context)
        self.targets = self.windows[:, 1:].reshape(-1)
        self.quantizer = SegmentQuantizer(model, group_size, calibration)
        self.context = context
        self.wire_dtype = wire_dtype
        self._reference = self._logits()
        self.tokens = self.targets.shape[0]
        self.ppl_reference = compare_logits(self._reference, self._reference, self.targets).ppl_reference
        # Per scored token, for confidence intervals over windows (bench/e2e): the unsplit model's
        # negative log-likelihood, and that of the last configuration measured.
        self.reference_nll = _token_nll(self._reference, self.targets)
        self.last_nll: torch.Tensor | None = None

    @torch.no_grad()
    def _logits(self) -> torch.Tensor:
        out = []
        for w in self.windows:
            self.current_ids = w  # what a transform with a token prediction sends beside the window
            out.append(self.model(w.unsqueeze(0)).logits[0, :-1].float())
        self.current_ids = None
        return torch.cat(out)

    def v2_config(self, split_layer: int, spec: dict) -> CodecConfigV2:
        """Calibrate the v2 ``spec`` at ``split_layer`` on the evaluator's calibration ids, with
        whatever weights are in place (inside :meth:`SegmentQuantizer.segments`: the point's)."""
        ids = self.quantizer.calibration
        if ids is None:
            raise ValueError("a codec v2 point needs calibration token ids (calibration=...), disjoint from the text")
        with torch.enable_grad():
            return config_for_model(spec, self.model, split_layer, ids, window=self.context,
                                    wire_dtype=self.wire_dtype)

    def measure(
        self,
        split_layer: int,
        front_bits: int | None,
        back_bits: int | None,
        codec: CodecConfig | dict | None,
        transform: Transform | None = None,
        front_method: str = "rtn",
    ) -> QualityPoint:
        """Quality of one configuration; ``transform`` overrides the codec round trip (baselines);
        ``front_method`` other than ``"rtn"`` and a v2 spec as ``codec`` need the evaluator's
        calibration ids."""
        log: list[TransferResult] = []
        position_shift: tuple[int, ...] = ()
        id_bits = 0
        with self.quantizer.segments(split_layer, front_bits, back_bits, front_method):
            if transform is None and codec is None:
                transform = fp16_transfer
            elif transform is None:
                config = self.v2_config(split_layer, codec) if is_v2_spec(codec) else codec
                prediction = getattr(config, "prediction", None)
                transform = codec_transform(config, self.wire_dtype, lambda: self.current_ids,
                                            table_for(prediction, self.model))
                position_shift = getattr(config, "position_shift", ())
                id_bits = 0 if prediction is None else prediction.id_bits
            with split_point(self.model, split_layer, transform, log):
                logits = self._logits()
                report = compare_logits(self._reference, logits, self.targets)
                self.last_nll = _token_nll(logits, self.targets)
        elements = sum(r.x_hat.numel() for r in log)
        rows = sum(r.x_hat.shape[0] for r in log)
        return QualityPoint(
            split_layer=split_layer,
            front_bits=front_bits,
            back_bits=back_bits,
            codec=None if codec is None else dict(codec) if isinstance(codec, dict) else codec.to_dict(),
            ppl_reference=report.ppl_reference,
            ppl=report.ppl_candidate,
            kl=report.kl,
            top1_agreement=report.top1_agreement,
            bits_per_element=8.0 * sum(r.nbytes for r in log) / elements,
            code_bits=sum(r.code_bits for r in log) / rows,
            outliers_per_token=sum(r.outliers for r in log) / rows,
            tokens=report.tokens,
            front_method=front_method,
            position_shift=position_shift,
            id_bits=id_bits,
        )


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


def fp16_transfer(x: torch.Tensor) -> TransferResult:
    """The plain split's transfer: values rounded to fp16, 16 bits per element."""
    return TransferResult(x.half().to(x.dtype), x.numel() * 2, 16.0 * x.shape[0], 0)


def calibrate(
    model: nn.Module,
    input_ids: torch.Tensor,
    split_layers: Iterable[int],
    front_bits: Iterable[int | None],
    back_bits: Iterable[int | None],
    codecs: Iterable[CodecConfig | dict | None],
    *,
    context: int = 512,
    group_size: int = 64,
    model_name: str = "model",
    text_name: str = "text",
    cache: str | os.PathLike | None = None,
    progress: Callable[[QualityPoint], None] | None = None,
    front_methods: Iterable[str] = ("rtn",),
    calibration: torch.Tensor | None = None,
    wire_dtype: torch.dtype = torch.float16,
) -> QualityTable:
    """Measure every (split layer, front bits, back bits, codec, front method) point not already
    in ``cache``; a front method other than ``"rtn"`` needs ``calibration`` token ids (disjoint
    from ``input_ids``).

    ``None`` in ``front_bits``/``back_bits`` means unquantised weights on that side; ``None``
    in ``codecs`` means fp16 transfer; a v2 spec is calibrated per point on ``calibration`` ids. A cache measured on another model, text, context or
    group size is ignored (and overwritten). Saves after every point, so an interrupted run
    resumes where it stopped.
    """
    table = QualityTable(model_name, text_name, context, group_size)
    if cache is not None and os.path.exists(cache):
        old = QualityTable.load(cache)
        if (old.model, old.text, old.context, old.group_size) == (model_name, text_name, context, group_size):
            table = old
    todo = [
        (l, f, b, c, m) for l in split_layers for f in front_bits for b in back_bits for c in codecs
        for m in front_methods if (f is not None or m == "rtn") and table.get(l, f, b, c, m) is None
    ]
    if todo:
        evaluator = SplitEvaluator(model, input_ids, context, group_size, calibration, wire_dtype)
        for l, f, b, c, m in todo:
            point = evaluator.measure(l, f, b, c, front_method=m)
            table.add(point)
            if progress is not None:
                progress(point)
            if cache is not None:
                table.save(cache)
    return table
