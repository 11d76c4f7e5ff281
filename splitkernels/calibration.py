"""Calibrated quantisation of a model's decoder layers, streamed one layer at a time.

Only one decoder layer's inputs are held at a time (edge-sized memory): the calibration token ids
are run once through the dense model to record the first layer's hidden state and the other
arguments each layer is called with (masks and position embeddings may differ per layer, e.g. for
sliding-window layers), then for each layer in turn its linears are quantised and the calibration
batch is pushed through the quantised layer to become the next layer's inputs, so every layer is
fitted to what the already-quantised layers before it produce.

The same batch also runs through the dense layers (a second hidden state per batch, no copy of
the weights: each layer runs dense before it is quantised). A calibrated linear is then fitted
not to reproduce its own dense output on the quantised path's inputs, but to match what the
dense model computes there (:func:`~splitkernels.gptq.dense_output_target`), so each layer also
corrects part of the error the layers before it left; this is what keeps a deep front (split 22
of 30 in SmolLM2) from accumulating error layer after layer.

Inside a layer the linears are quantised stage by stage in the order the layer uses them: linears
that read the same input tensor form one stage (in a Llama layer q/k/v, then o, then gate/up,
then down) and share one Hessian, collected by running the layer with the earlier stages already
quantised. Stages are found by watching one forward pass, so nothing here names a model family.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .gptq import HessianAccumulator, dense_output_target, gptq_quantize
from .nn.config import QuantConfig
from .nn.linear import QuantLinear, dense_weight, is_conv1d, is_plain_linear
from .quant import QuantizedWeight, quantize_weight

# A 1-D stream of calibration ids is cut into rows of this many tokens.
CALIBRATION_SEQ_LEN = 512
# Rows per forward pass (bounds the attention scores held at once).
_ROWS_PER_PASS = 4

# {layer index: {linear name inside the layer: config}}
LayerPlan = Mapping[int, Mapping[str, QuantConfig]]


class _Stop(Exception):
    """Raised from a hook once the inputs it needed were seen; ends the forward pass early."""


def calibration_rows(calibration: torch.Tensor, seq_len: int = CALIBRATION_SEQ_LEN) -> torch.Tensor:
    """Token ids ``[L]`` (cut into rows of ``seq_len``, the remainder dropped) or ``[n, L]`` as rows."""
    if not isinstance(calibration, torch.Tensor) or calibration.dtype not in (torch.int32, torch.int64):
        raise TypeError("calibration must be an int64 (or int32) tensor of token ids, "
                        f"got {type(calibration).__name__}{'' if not isinstance(calibration, torch.Tensor) else ' ' + str(calibration.dtype)}")
    if calibration.dim() == 1:
        n = calibration.shape[0] // seq_len
        calibration = calibration[: n * seq_len].reshape(n, seq_len) if n else calibration.unsqueeze(0)
    if calibration.dim() != 2 or calibration.shape[1] < 2:
        raise ValueError(f"calibration must be [L] or [n, L] token ids with L >= 2, got shape {tuple(calibration.shape)}")
    return calibration.long()


def is_linear(module: nn.Module) -> bool:
    """The layers this module quantises: those ``replace_linear`` would (:func:`is_plain_linear`)."""
    return is_plain_linear(module)


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(qualified name, layers)``: the longest ``nn.ModuleList`` whose entries hold linears (a
    decoder's layer stack, whatever the family calls it)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(
                any(is_linear(m) for m in layer.modules()) for layer in module):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(f"calibrated quantisation needs a model with a stack of layers (an nn.ModuleList of "
                         f"modules holding linears); {type(model).__name__} has none")
    return best


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _run_model(model: nn.Module, ids: torch.Tensor) -> None:
    if hasattr(model, "config"):  # a transformers model: no KV cache for a plain scoring pass
        model(ids, use_cache=False)
    else:
        model(ids)


class _LayerCall:
    """One batch through the layer stack: the current hidden state, and the other arguments the
    model passed to each layer (recorded once; they do not depend on the hidden state)."""

    def __init__(self) -> None:
        self.hidden: torch.Tensor | None = None
        # The same batch through the dense layers (when calibrated layers match dense outputs).
        self.dense_hidden: torch.Tensor | None = None
        self.arguments: dict[int, tuple[bool, tuple, dict]] = {}

    def record(self, index: int, args: tuple, kwargs: dict) -> None:
        in_kwargs = not args
        if self.hidden is None:
            self.hidden = kwargs["hidden_states"] if in_kwargs else args[0]
        self.arguments[index] = (in_kwargs, args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})

    def run(self, index: int, layer: nn.Module, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Layer ``index``'s output for the current hidden state (or for ``hidden``)."""
        in_kwargs, args, kwargs = self.arguments[index]
        hidden = self.hidden if hidden is None else hidden
        out = layer(*args, hidden_states=hidden, **kwargs) if in_kwargs else layer(hidden, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _capture_calls(model: nn.Module, layers: nn.ModuleList, last: int, rows: torch.Tensor) -> list[_LayerCall]:
    """Run the dense model on ``rows`` (in batches) up to layer ``last``, recording each layer's call."""
    calls: list[_LayerCall] = []

    def watch(index):
        def hook(_module, args, kwargs):
            calls[-1].record(index, args, kwargs)
            if index == last:
                raise _Stop
        return hook

    handles = [layers[i].register_forward_pre_hook(watch(i), with_kwargs=True) for i in range(last + 1)]
    try:
        for start in range(0, rows.shape[0], _ROWS_PER_PASS):
            calls.append(_LayerCall())
            try:
                _run_model(model, rows[start:start + _ROWS_PER_PASS].to(_device(model)))
            except _Stop:
                pass
            if len(calls[-1].arguments) != last + 1:
                raise ValueError(f"the model did not call layers 0..{last} of the layer stack in one forward pass")
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _stages(index: int, layer: nn.Module, linears: Mapping[str, nn.Module], call: _LayerCall) -> list[list[str]]:
    """Names of ``linears`` grouped by the input tensor they read, in the order the layer reads them
    (linears the layer never calls come last, as one stage)."""
    seen: list[tuple[torch.Tensor, list[str]]] = []
    handles = []

    def watch(name):
        def hook(_module, args):
            for tensor, names in seen:
                if args[0] is tensor:
                    names.append(name)
                    return
            seen.append((args[0], [name]))
        return hook

    for name, module in linears.items():
        handles.append(module.register_forward_pre_hook(watch(name)))
    try:
        call.run(index, layer)
    finally:
        for handle in handles:
            handle.remove()
    stages = [names for _, names in seen]
    unused = [name for name in linears if not any(name in s for s in stages)]
    return stages + ([unused] if unused else [])


def _dense_pass(index: int, layer: nn.Module, linears: Mapping[str, nn.Module],
                calls: Sequence[_LayerCall]) -> list[dict[str, torch.Tensor]]:
    """Run the still-dense layer on each call's dense hidden state: the input every linear in
    ``linears`` sees on the dense path (per call), and each call's next dense hidden state."""
    inputs: list[dict[str, torch.Tensor]] = []
    handles = []

    def watch(name):
        def hook(_module, args):
            inputs[-1][name] = args[0]
        return hook

    for name, module in linears.items():
        handles.append(module.register_forward_pre_hook(watch(name)))
    try:
        for call in calls:
            inputs.append({})
            call.dense_hidden = call.run(index, layer, call.dense_hidden)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def _quantize(module: nn.Module, config: QuantConfig, hessian: HessianAccumulator) -> QuantizedWeight:
    weight, _ = dense_weight(module)
    group = config.group_size_for(weight.shape[1])
    dtype = config.scale_dtype_for(weight.dtype)
    if config.method == "gptq" and hessian.rows:
        if hessian.cross is not None:
            weight = dense_output_target(weight, hessian.hessian, hessian.cross)
        return gptq_quantize(weight, hessian.hessian, config.bits, group, dtype=dtype)
    return quantize_weight(weight, config.bits, group, clip_search=config.clip_search, dtype=dtype)


def _set_dense(module: nn.Module, qw: QuantizedWeight) -> None:
    """Make the dense module compute with the quantised weight (for the stages and layers after it)."""
    w = qw.dequantize(module.weight.dtype)
    module.weight.data = w.t().contiguous() if is_conv1d(module) else w


def _quantize_layer(index: int, layer: nn.Module, plan: Mapping[str, QuantConfig],
                    calls: Sequence[_LayerCall], match_dense: bool) -> dict[str, QuantizedWeight]:
    linears = {name: layer.get_submodule(name) for name in plan}
    stages = _stages(index, layer, linears, calls[0])
    dense_inputs = _dense_pass(index, layer, linears, calls) if match_dense else None
    done: dict[str, QuantizedWeight] = {}
    for stage in stages:
        hessian = HessianAccumulator(dense_weight(linears[stage[0]])[0].shape[1], _device(layer))
        if any(plan[name].method == "gptq" for name in stage):
            current = 0

            def collect(_module, args):
                hessian.add(args[0], None if dense_inputs is None else dense_inputs[current][stage[0]])
                raise _Stop  # every linear of the stage reads this same input

            handle = linears[stage[0]].register_forward_pre_hook(collect)
            try:
                for current, call in enumerate(calls):
                    try:
                        call.run(index, layer)
                    except _Stop:
                        pass
            finally:
                handle.remove()
        for name in stage:
            done[name] = _quantize(linears[name], plan[name], hessian)
            _set_dense(linears[name], done[name])
    return done


@torch.no_grad()
def quantize_layers(model: nn.Module, layers: nn.ModuleList, plan: LayerPlan, calibration: torch.Tensor,
                    *, progress: bool = True) -> nn.Module:
    """Quantise, in place, the linears named in ``plan`` (``{layer index: {name in layer: config}}``)
    of ``model``'s decoder ``layers``, each replaced by a :class:`~splitkernels.nn.QuantLinear`.

    ``calibration`` is token ids, ``[L]`` (cut into rows of :data:`CALIBRATION_SEQ_LEN`) or
    ``[n, L]``. Configs with ``method="gptq"`` are fitted to the inputs their linear sees when the
    calibration rows run through the model with every earlier linear already quantised, towards the
    outputs the dense model's linear gives at the same positions; ``"rtn"``
    configs are rounded to nearest (and still feed quantised inputs to the layers after them).
    ``progress`` shows a tqdm bar over the layers. Returns ``model``.
    """
    from tqdm.auto import tqdm

    rows = calibration_rows(calibration)
    for index, names in plan.items():
        if not 0 <= index < len(layers):
            raise ValueError(f"plan has layer index {index}; layers holds {len(layers)}")
        for name, config in names.items():
            if not isinstance(config, QuantConfig):
                raise TypeError(f"plan[{index}][{name!r}] must be a QuantConfig, got {type(config).__name__}")
            if not is_linear(layers[index].get_submodule(name)):
                raise TypeError(f"plan[{index}][{name!r}] is a {type(layers[index].get_submodule(name)).__name__}, "
                                "not a linear layer")
    todo = sorted(i for i, names in plan.items() if names)
    if not todo:
        return model
    calls = _capture_calls(model, layers, todo[-1], rows)
    match_dense = any(config.method == "gptq" for names in plan.values() for config in names.values())
    for call in calls:
        call.dense_hidden = call.hidden if match_dense else None
    quantised: dict[int, dict[str, QuantizedWeight]] = {}
    for index in tqdm(range(todo[-1] + 1), desc="calibrating", unit="layer", disable=not progress):
        layer = layers[index]
        if plan.get(index):
            quantised[index] = _quantize_layer(index, layer, plan[index], calls, match_dense)
        elif match_dense:
            for call in calls:
                call.dense_hidden = call.run(index, layer, call.dense_hidden)
        if index < todo[-1]:
            for call in calls:
                call.hidden = call.run(index, layer)
    for index, done in quantised.items():
        for name, qw in done.items():
            _, bias = dense_weight(layers[index].get_submodule(name))
            parent, _, child = name.rpartition(".")
            owner = layers[index].get_submodule(parent) if parent else layers[index]
            setattr(owner, child, QuantLinear.from_quantized(qw, bias))
    return model


__all__ = ["quantize_layers", "calibration_rows", "find_layer_stack", "is_linear", "CALIBRATION_SEQ_LEN"]
