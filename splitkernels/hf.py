"""transformers integration: quantised models round-trip through ``save_pretrained`` / ``from_pretrained``.

Importing this module registers the quantization method ``"splitkernels"`` with transformers
(:class:`SplitkernelsConfig` and :class:`SplitkernelsHfQuantizer`). :func:`splitkernels.quantize_`
imports it and attaches the config to a transformers model, so ``save_pretrained`` writes it
into ``config.json``. In a fresh process::

    import splitkernels.hf  # registers the method
    model = AutoModelForCausalLM.from_pretrained(path)

rebuilds every low-bit layer from the config's module map before the weights are loaded; the
user calls no custom loader. The module map names each quantised module with its own bits and
group size (group sizes adapt per layer, and OPSC uses two precisions), so loading never
guesses. A quantised input embedding unties a tied LM head first (the head keeps a dense copy,
saved as its own tensor).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .formats import WEIGHT_FORMAT_VERSION
from .nn.config import SCALE_DTYPES
from .nn.linear import QuantEmbedding, QuantLinear, is_conv1d

METHOD = "splitkernels"


class SplitkernelsConfig(QuantizationConfigMixin):
    """What transformers stores in ``config.json["quantization_config"]`` for a splitkernels model.

    ``modules``: ``{qualified name: {"kind": "linear" | "embedding", "bits": b, "group_size": g}}``
    for every low-bit module (with ``"scale_dtype"`` where its scales are not in the model's
    dtype: :attr:`QuantConfig.scale_dtype`); ``config``: the front-door config that produced them
    (for people reading the file; loading uses only ``modules``); ``format_version``: the packed
    weight format (docs/FORMATS.md section 2).
    """

    def __init__(
        self,
        modules: dict[str, dict[str, Any]] | None = None,
        config: dict[str, Any] | None = None,
        format_version: int = WEIGHT_FORMAT_VERSION,
        **kwargs: Any,
    ) -> None:
        self.quant_method = METHOD
        self.modules = dict(modules or {})
        self.config = dict(config or {})
        self.format_version = format_version
        if format_version != WEIGHT_FORMAT_VERSION:
            raise ValueError(f"quantization_config.format_version is {format_version}; this splitkernels reads "
                             f"version {WEIGHT_FORMAT_VERSION}")
        for name, spec in self.modules.items():
            if spec.get("kind") not in ("linear", "embedding"):
                raise ValueError(f"quantization_config.modules[{name!r}].kind must be 'linear' or 'embedding', "
                                 f"got {spec.get('kind')!r}")
            if spec.get("scale_dtype", "float32") not in SCALE_DTYPES:
                raise ValueError(f"quantization_config.modules[{name!r}].scale_dtype must be one of "
                                 f"{tuple(SCALE_DTYPES)}, got {spec['scale_dtype']!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": METHOD, "modules": self.modules, "config": self.config,
                "format_version": self.format_version}


class SplitkernelsHfQuantizer(HfQuantizer):
    """Rebuilds the low-bit modules named by a :class:`SplitkernelsConfig` before weights load.

    Quantising happens in :func:`splitkernels.quantize_`, not at load time, so only
    pre-quantised checkpoints are accepted.
    """

    requires_calibration = True

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        modules = self.quantization_config.modules
        if any(spec["kind"] == "embedding" for spec in modules.values()):
            untie_head(model)
        for name, spec in modules.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            dense = getattr(parent, child)
            setattr(parent, child, _empty_like(name, dense, spec))
            # Some families' weight init reaches into children by name (GPT-2 rescales
            # ``c_proj.weight`` from the attention block); the checkpoint sets every tensor here.
            if parent is not model:
                parent._is_hf_initialized = True
        # transformers loads tensors by attribute name; the layouts come from the config instead.
        _write_layouts(model, False)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        _write_layouts(model, True)
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The state dict without the per-module layout tensors: config.json carries the layouts."""
        _write_layouts(model, False)
        try:
            return model.state_dict(), {}
        finally:
            _write_layouts(model, True)

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _empty_like(name: str, dense: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """An empty low-bit module with ``dense``'s shape, device and dtype and ``spec``'s layout."""
    weight = dense.weight
    bits, group = int(spec["bits"]), int(spec["group_size"])
    dtype = SCALE_DTYPES[spec["scale_dtype"]] if "scale_dtype" in spec else weight.dtype
    if spec["kind"] == "embedding":
        if not isinstance(dense, nn.Embedding):
            raise TypeError(f"quantization_config names {name} as an embedding, the model has a {type(dense).__name__}")
        return QuantEmbedding(dense.num_embeddings, dense.embedding_dim, bits, group, dtype, weight.device)
    if isinstance(dense, nn.Linear):
        n, k = dense.out_features, dense.in_features
    elif is_conv1d(dense):  # GPT-2 style, weight stored [in, out]
        k, n = weight.shape
    else:
        raise TypeError(f"quantization_config names {name} as a linear layer, the model has a {type(dense).__name__}")
    return QuantLinear(k, n, dense.bias is not None, bits, group, dtype, weight.device)


def untie_head(model: nn.Module) -> None:
    """Give a head tied to the input embedding its own copy of the table and mark the model untied,
    so the table can be stored at low bits while the head stays dense (and saves as its own tensor)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is not None and table is not None and getattr(head, "weight", None) is getattr(table, "weight", None):
        head.weight = nn.Parameter(table.weight.detach().clone(), requires_grad=False)
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        text.tie_word_embeddings = False


def _write_layouts(model: nn.Module, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            module.write_layout_to_state_dict = on


def module_map(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The ``modules`` entry of a :class:`SplitkernelsConfig` for ``model`` as it is now."""
    out: dict[str, dict[str, Any]] = {}
    model_dtype = getattr(model, "dtype", None)
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            kind = "linear" if isinstance(module, QuantLinear) else "embedding"
            out[name] = {"kind": kind, "bits": module.bits, "group_size": module.group_size}
            if model_dtype is not None and module.scale.dtype != model_dtype:
                out[name]["scale_dtype"] = str(module.scale.dtype).removeprefix("torch.")
    return out


def attach(model: nn.Module, config: dict[str, Any]) -> None:
    """Record on a transformers model how it was quantised, so ``save_pretrained`` writes it."""
    modules = module_map(model)
    if any(spec["kind"] == "embedding" for spec in modules.values()):
        untie_head(model)
    quant_config = SplitkernelsConfig(modules=modules, config=config)
    model.config.quantization_config = quant_config
    model.hf_quantizer = SplitkernelsHfQuantizer(quant_config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = METHOD


def register() -> None:
    """Register the method with transformers (idempotent; done on import)."""
    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(SplitkernelsConfig)
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(METHOD)(SplitkernelsHfQuantizer)


register()

__all__ = ["SplitkernelsConfig", "SplitkernelsHfQuantizer", "attach", "module_map", "register", "untie_head"]
