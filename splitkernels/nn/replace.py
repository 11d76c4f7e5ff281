"""Replace the linear layers of a model (transformers or plain PyTorch) with QuantLinear."""
from __future__ import annotations

import fnmatch
from typing import Callable, Mapping

import torch
from torch import nn

from .config import QuantConfig
from .linear import QuantLinear, dense_weight, is_conv1d, is_plain_linear

ModuleFilter = Callable[[str, nn.Module], bool]


def _output_embedding_names(model: nn.Module, candidates: dict[str, nn.Module]) -> set[str]:
    """Qualified names of the LM head: the model's output embeddings and any linear tied to its
    input embedding table (quantising those would also change the embedding, or the logits)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    table_weight = getattr(table, "weight", None)
    return {
        name for name, module in candidates.items()
        if module is head or (table_weight is not None and getattr(module, "weight", None) is table_weight)
    }


def _config_for(name: str, default: QuantConfig, overrides: Mapping[str, QuantConfig | None]):
    """(matched, config): the first override pattern matching ``name`` wins."""
    for pattern, config in overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            return True, config
    return False, default


def replace_linear(
    model: nn.Module,
    bits: int = 4,
    group_size: int = 128,
    filter: ModuleFilter | None = None,
    overrides: Mapping[str, QuantConfig | None] | None = None,
    clip_search: bool = False,
    progress: bool = True,
    *,
    method: str = "rtn",
    calibration: torch.Tensor | None = None,
    scale_dtype: str | None = None,
) -> nn.Module:
    """Replace every matching ``nn.Linear`` (and transformers ``Conv1D``) in ``model`` with a
    :class:`QuantLinear`, in place, and return ``model``.

    * ``bits``, ``group_size``, ``clip_search``, ``method``, ``scale_dtype``: the default
      :class:`QuantConfig`.
    * ``filter(qualified_name, module) -> bool``: only modules it accepts are considered.
    * ``overrides``: ``{glob pattern on the qualified name: QuantConfig or None}``; the first
      matching pattern (in insertion order) gives the module's config, ``None`` keeps it dense.
    * The LM head (output embeddings, or a linear tied to the input embedding) stays dense
      unless an override pattern names it explicitly.
    * A group size that does not divide a layer's input size is adapted per layer
      (:meth:`QuantConfig.group_size_for`); each QuantLinear records the size it uses.
    * ``calibration``: token ids (``[L]`` or ``[n, L]``), required when any config has
      ``method="gptq"``: the model's decoder layers are then quantised one after another on
      these inputs (:func:`splitkernels.calibration.quantize_layers`); calibrated linears must
      lie inside the decoder layers.
    * ``progress``: a tqdm bar over the layers being quantised.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    default = QuantConfig(bits, group_size, clip_search, method, scale_dtype)
    overrides = dict(overrides or {})
    for pattern, config in overrides.items():
        if not isinstance(pattern, str) or not (config is None or isinstance(config, QuantConfig)):
            raise TypeError(f"overrides must map str patterns to QuantConfig or None, got {pattern!r}: {config!r}")
    if isinstance(model, nn.Linear) or is_conv1d(model):
        raise TypeError("model is itself a linear layer; use QuantLinear.from_linear for a single layer")
    if filter is not None and not callable(filter):
        raise TypeError(f"filter must be callable(name, module) -> bool, got {type(filter).__name__}")

    candidates = {
        name: module for name, module in model.named_modules()
        if is_plain_linear(module) and (filter is None or filter(name, module))
    }
    heads = _output_embedding_names(model, candidates)
    plan = []
    for name, module in candidates.items():
        matched, config = _config_for(name, default, overrides)
        if config is None or (name in heads and not matched):
            continue
        plan.append((name, config))

    if any(config.method != "rtn" for _, config in plan):
        _calibrate(model, candidates, plan, calibration, progress)
    else:
        _round(model, candidates, plan, progress)
    return model


def _round(model: nn.Module, candidates: dict[str, nn.Module], plan: list[tuple[str, QuantConfig]],
           progress: bool) -> None:
    """Round-to-nearest quantisation of the planned linears (no data needed)."""
    from tqdm.auto import tqdm

    for name, config in tqdm(plan, desc="quantising", unit="layer", disable=not progress or not plan):
        module = candidates[name]
        weight, _ = dense_weight(module)
        layer = QuantLinear.from_linear(module, config.bits, config.group_size_for(weight.shape[1]),
                                        config.clip_search, config.scale_dtype_for(weight.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def _calibrate(model: nn.Module, candidates: dict[str, nn.Module], plan: list[tuple[str, QuantConfig]],
               calibration: torch.Tensor | None, progress: bool) -> None:
    """Round the planned linears outside the decoder layers first (so calibration sees, e.g., a
    quantised input projection), then quantise the layers up to the last calibrated one in turn
    on ``calibration``, then round the layers after it."""
    from ..calibration import find_layer_stack, quantize_layers  # calibration builds on this package

    if calibration is None:
        raise ValueError("calibration token ids are required for method='gptq'")
    stack, layers = find_layer_stack(model)
    prefix = f"{stack}." if stack else ""
    located = []
    for name, config in plan:
        index, _, inner = name[len(prefix):].partition(".") if name.startswith(prefix) else ("", "", "")
        if not index.isdigit() and config.method != "rtn":
            raise ValueError(f"{name} lies outside the decoder layers ({stack}); calibrated quantisation covers "
                             "linears inside them, so give it method='rtn' in overrides")
        located.append((int(index) if index.isdigit() else None, inner, name, config))
    last = max(index for index, _, _, config in located if config.method != "rtn")
    layer_plan: dict[int, dict[str, QuantConfig]] = {}
    for index, inner, _, config in located:
        if index is not None and index <= last:
            layer_plan.setdefault(index, {})[inner] = config
    _round(model, candidates, [(name, config) for index, _, name, config in located if index is None], progress)
    quantize_layers(model, layers, layer_plan, calibration, progress=progress)
    _round(model, candidates, [(name, config) for index, _, name, config in located
                               if index is not None and index > last], progress)
