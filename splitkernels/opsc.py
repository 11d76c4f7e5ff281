"""OPSC, one-point split compression (docs/DESIGN.md §1): the decoder layers in front of the split point
(the edge) are stored at one weight precision, the layers behind it (the server) at another, and
the precision changes exactly once, at the split. No fine-tuning: group-wise rounding to nearest
(``method="rtn"``) or calibrated error feedback on a few hundred tokens (``method="gptq"``,
:mod:`splitkernels.calibration`).

This is the project's own reconstruction of the method named in the README (docs/DESIGN.md §1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .calibration import is_linear, quantize_layers
from .models import adapter_for, decoder_layers
from .models.layout import tensors_nbytes
from .nn import QuantConfig, QuantEmbedding, replace_linear


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module``, each shared tensor counted once."""
    return tensors_nbytes([*module.parameters(), *module.buffers()])


@dataclass
class OPSCReport:
    """What :func:`apply_opsc` did and the weight bytes each side of the split has to hold.

    The front (edge) holds the embeddings and layers ``1..split_layer``; the back (server)
    holds the remaining layers, the final norm and the LM head. A tensor used on both sides
    (tied embedding and head) is counted on both, since each machine needs its own copy.
    """

    split_layer: int
    num_layers: int
    front: QuantConfig | None
    back: QuantConfig | None
    quantize_embedding: bool
    front_weight_bytes: int
    back_weight_bytes: int

    def __str__(self) -> str:
        def side(config):
            return "dense" if config is None else str(config)

        emb = ", embedding quantised" if self.quantize_embedding else ""
        return (
            f"OPSC split after layer {self.split_layer} of {self.num_layers}: "
            f"front (embedding + layers 1-{self.split_layer}) {side(self.front)}{emb}: "
            f"{self.front_weight_bytes / 2**20:.2f} MiB; "
            f"back (layers {self.split_layer + 1}-{self.num_layers} + norm + head) {side(self.back)}: "
            f"{self.back_weight_bytes / 2**20:.2f} MiB"
        )


def split_weight_bytes(model: nn.Module, split_layer: int) -> tuple[int, int]:
    """(front, back) weight bytes of ``model`` cut after ``split_layer`` layers, as in :class:`OPSCReport`.

    What each side holds is what it runs (found by tracing the model, see
    :meth:`splitkernels.models.Adapter.weight_bytes`), so this holds for every family.
    """
    adapter = adapter_for(model)
    _check_split(split_layer, adapter.num_layers)
    return adapter.weight_bytes(0, split_layer), adapter.weight_bytes(split_layer, adapter.num_layers)


def _check_split(split_layer: int, num_layers: int) -> None:
    if isinstance(split_layer, bool) or not isinstance(split_layer, int) or not 0 <= split_layer <= num_layers:
        raise ValueError(f"split_layer must be an int in [0, {num_layers}] (number of front layers), "
                         f"got {split_layer!r}")


def apply_opsc(
    model: nn.Module,
    split_layer: int,
    front: QuantConfig | None,
    back: QuantConfig | None,
    quantize_embedding: bool = False,
    *,
    calibration: torch.Tensor | None = None,
    progress: bool = True,
) -> OPSCReport:
    """Quantise, in place, decoder layers ``1..split_layer`` (indices ``0..split_layer-1``) at
    ``front`` and the rest at ``back``; ``None`` keeps that side dense.

    ``quantize_embedding`` also stores the input token embedding at ``front`` (row-wise groups);
    a head tied to it keeps its dense copy on the back. A side with ``method="gptq"`` needs
    ``calibration`` token ids (``[L]`` or ``[n, L]``; a few thousand tokens of ordinary text):
    its layers are fitted to the inputs they see with every earlier layer already quantised
    (:func:`splitkernels.calibration.quantize_layers`, a tqdm bar when ``progress``). Returns
    the bytes per side.
    """
    for name, config in (("front", front), ("back", back)):
        if config is not None and not isinstance(config, QuantConfig):
            raise TypeError(f"{name} must be a QuantConfig or None, got {type(config).__name__}")
    layers = decoder_layers(model)
    _check_split(split_layer, len(layers))
    if quantize_embedding and front is None:
        raise ValueError("quantize_embedding needs a front QuantConfig (front is None)")
    configs = [front if index < split_layer else back for index in range(len(layers))]
    calibrated = [index for index, config in enumerate(configs) if config is not None and config.method != "rtn"]
    if calibrated and calibration is None:
        raise ValueError("calibration token ids are required when front or back uses method='gptq'")
    if quantize_embedding:
        # First, so that calibrated layers see the embedding the edge will really produce.
        table = model.get_input_embeddings()
        if not isinstance(table, nn.Embedding):
            raise TypeError(f"quantize_embedding needs an nn.Embedding input table, got {type(table).__name__}")
        quantized = QuantEmbedding.from_embedding(table, front.bits, front.group_size_for(table.embedding_dim),
                                                  front.clip_search)
        model.set_input_embeddings(quantized)
    # Layers up to the last calibrated one are streamed (earlier RTN layers shape its inputs);
    # the plain rounding of the layers after it needs no data.
    streamed = calibrated[-1] + 1 if calibrated else 0
    if streamed:
        plan = {index: {name: configs[index] for name, m in layers[index].named_modules() if is_linear(m)}
                for index in range(streamed) if configs[index] is not None}
        quantize_layers(model, layers, plan, calibration, progress=progress)
    for index in range(streamed, len(layers)):
        config = configs[index]
        if config is not None:
            replace_linear(layers[index], config.bits, config.group_size, clip_search=config.clip_search,
                           progress=False)
    front_bytes, back_bytes = split_weight_bytes(model, split_layer)
    return OPSCReport(split_layer, len(layers), front, back, quantize_embedding, front_bytes, back_bytes)


__all__ = ["apply_opsc", "decoder_layers", "weight_bytes", "split_weight_bytes", "OPSCReport"]
