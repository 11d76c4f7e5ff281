"""The front door: ``quantize_(model, config)`` with a frozen config, in place.

* :class:`~splitkernels.nn.QuantConfig`: every ``nn.Linear`` (and transformers ``Conv1D``) that
  ``filter_fn`` accepts becomes a :class:`~splitkernels.nn.QuantLinear` (the LM head stays
  dense unless an override names it); ``overrides`` maps glob patterns on qualified names to
  a per-module config (or None: keep dense).
* :class:`~splitkernels.nn.OPSCConfig`: one precision in front of the split, another behind it
  (:func:`splitkernels.opsc.apply_opsc`).

On a transformers model the result also carries a ``quantization_config``, so
``save_pretrained`` writes it and ``from_pretrained`` rebuilds the low-bit layers (after
``import splitkernels.hf`` in the loading process).
"""
from __future__ import annotations

import sys
from typing import Callable, Mapping

import torch
from torch import nn

from .nn import OPSCConfig, QuantConfig, replace_linear

FilterFn = Callable[[nn.Module, str], bool]


def quantize_(
    model: nn.Module,
    config: QuantConfig | OPSCConfig,
    filter_fn: FilterFn | None = None,
    overrides: Mapping[str, QuantConfig | None] | None = None,
    *,
    calibration: torch.Tensor | None = None,
) -> nn.Module:
    """Quantise ``model`` in place according to ``config`` and return it.

    ``filter_fn(module, qualified_name) -> bool`` (QuantConfig only) limits which linear layers
    are considered; ``overrides`` (QuantConfig only) gives per-module configs by glob pattern;
    ``calibration`` token ids feed a config with ``method="gptq"`` (see :mod:`splitkernels.gptq`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable(module, name) -> bool, got {type(filter_fn).__name__}")
    if isinstance(config, QuantConfig):
        keep = None if filter_fn is None else (lambda name, module: bool(filter_fn(module, name)))
        replace_linear(model, config.bits, config.group_size, filter=keep, overrides=overrides,
                       clip_search=config.clip_search, progress=False, method=config.method,
                       calibration=calibration, scale_dtype=config.scale_dtype)
        record = {"type": "QuantConfig", **config.to_dict()}
        if overrides:
            record["overrides"] = {k: None if v is None else v.to_dict() for k, v in overrides.items()}
    elif isinstance(config, OPSCConfig):
        if filter_fn is not None or overrides:
            raise ValueError("filter_fn and overrides apply to a QuantConfig; "
                             "an OPSCConfig chooses layers by split_layer")
        from .opsc import apply_opsc

        apply_opsc(model, config.split_layer, config.front, config.back, config.quantize_embedding,
                   calibration=calibration, progress=False)
        record = {"type": "OPSCConfig", **config.to_dict()}
    else:
        raise TypeError(f"config must be a QuantConfig or an OPSCConfig, got {type(config).__name__}")
    if _is_transformers_model(model):
        from .hf import attach

        attach(model, record)
    return model


def _is_transformers_model(model: nn.Module) -> bool:
    # transformers is optional; a model from it means the library is already imported.
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


__all__ = ["quantize_"]
