"""Where a Hugging Face decoder-only model keeps its decoder layers, found from the modules
themselves rather than from a table of families, and which weights each side of a split uses.

Everything here is generic: the decoder layers are the outermost ``nn.ModuleList`` with at
least ``num_hidden_layers`` entries, and the weights a side needs are the tensors of the
modules that actually run on that side, found by tracing one forward pass with hooks.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn


class UnsupportedModel(TypeError, ValueError):
    """The model is not a decoder-only causal LM the split can run (a TypeError and, as OPSC used
    to raise, a ValueError)."""


def text_config(config):
    """The decoder's config (the text half of a multimodal config; the config itself otherwise)."""
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if callable(getter) else config


def num_decoder_layers(config) -> int:
    """``num_hidden_layers`` of the decoder (``n_layer`` and similar names map to it in transformers)."""
    n = getattr(text_config(config), "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise UnsupportedModel(f"the model config has no usable num_hidden_layers (got {n!r})")
    return n


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted path, list) of the decoder layers: the outermost ``nn.ModuleList`` holding at least
    ``config.num_hidden_layers`` modules with parameters. TypeError if the model has none."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModel(f"model must be a Hugging Face decoder-only causal LM with a config, "
                        f"got {type(model).__name__}")
    n = num_decoder_layers(config)
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < n or not name:
            continue
        # Parameters or buffers: a layer of low-bit linears and weightless norms holds only buffers.
        if not all(any(True for _ in m.parameters()) or any(True for _ in m.buffers()) for m in list(module)[:n]):
            continue
        depth = name.count(".")
        if best is None or depth < best[0]:
            best = (depth, name, module)
    if best is None:
        raise UnsupportedModel(f"model must be a decoder-only causal LM whose decoder layers are an nn.ModuleList of "
                        f"num_hidden_layers={n} modules; {type(model).__name__} has none")
    return best[1], best[2]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``num_hidden_layers`` decoder layers of ``model``, in order (the model's own list
    unless it holds more, such as multi-token-prediction layers after them)."""
    layers = find_decoder_layers(model)[1]
    n = num_decoder_layers(model.config)
    return layers if len(layers) == n else layers[:n]


def _shallow(module: nn.Module) -> nn.Module:
    """A second module object sharing every parameter, buffer and child, with its own child table."""
    clone = object.__new__(type(module))
    clone.__dict__.update(module.__dict__)
    object.__setattr__(clone, "_modules", dict(module._modules))
    return clone


def view_with_layers(model: nn.Module, path: str, layers: Iterable[nn.Module]) -> nn.Module:
    """A view of ``model`` that runs the model's own ``forward`` with ``layers`` in place of the
    list at ``path``; the model itself is left untouched and shares every weight with the view."""
    parts = path.split(".")
    root = _shallow(model)
    node = root
    for part in parts[:-1]:
        child = _shallow(node._modules[part])
        node._modules[part] = child
        node = child
    node._modules[parts[-1]] = nn.ModuleList(list(layers))
    return root


def direct_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and persistent buffers of ``module`` itself. Non-persistent buffers (such as
    rotary frequency tables) are derived from the config, not stored weights."""
    skip = module._non_persistent_buffers_set
    return [*module.parameters(recurse=False),
            *(b for name, b in module.named_buffers(recurse=False) if name not in skip)]


def tensors_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors``, each distinct tensor counted once."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@dataclass
class Trace:
    """Modules with their own parameters or buffers that ran before the decoder layers (``pre``),
    inside layer ``i`` (``layers[i]``, shared modules a layer calls included) and after the last
    layer (``post``)."""

    pre: list[nn.Module] = field(default_factory=list)
    layers: list[list[nn.Module]] = field(default_factory=list)
    post: list[nn.Module] = field(default_factory=list)

    def tensors(self, first: int, last: int, pre: bool, post: bool) -> list[torch.Tensor]:
        """Tensors of layers ``first..last-1``, plus the pre-/post-layer modules if asked."""
        modules = (self.pre if pre else []) + [m for i in range(first, last) for m in self.layers[i]] + \
            (self.post if post else [])
        return [t for m in modules for t in direct_tensors(m)]


def trace(model: nn.Module, call) -> Trace:
    """Run ``call()`` (one forward of ``model``) and record which modules ran in which phase."""
    layers = decoder_layers(model)
    out = Trace(layers=[[] for _ in layers])
    state = {"phase": "pre"}
    seen: set[tuple[int, object]] = set()
    handles = []

    def record(module, _args):
        phase = state["phase"]
        if (id(module), phase) in seen:
            return
        seen.add((id(module), phase))
        (out.pre if phase == "pre" else out.post if phase == "post" else out.layers[phase]).append(module)

    def enter(i):
        def hook(_module, _args):
            state["phase"] = i
        return hook

    def leave(i):
        def hook(_module, _args, _out):
            state["phase"] = "post" if i == len(layers) - 1 else i
        return hook

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(enter(i)))
            handles.append(layer.register_forward_hook(leave(i)))
        for module in model.modules():
            if direct_tensors(module):
                handles.append(module.register_forward_pre_hook(record))
        # Tensors a layer owns count for it even if no hook saw them run (e.g. used as plain tensors).
        for i, layer in enumerate(layers):
            out.layers[i].extend(m for m in layer.modules() if direct_tensors(m))
        call()
    finally:
        for h in handles:
            h.remove()
    for i in range(len(layers)):  # a module listed twice in one phase counts once
        out.layers[i] = list({id(m): m for m in out.layers[i]}.values())
    return out


def cache_nbytes(cache) -> int:
    """Bytes held by the tensors of a transformers cache (each cache layer object counted once)."""
    if cache is None:
        return 0
    tensors: list[torch.Tensor] = []
    seen: set[int] = set()
    for layer in getattr(cache, "layers", ()):
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                tensors.append(value)
            elif isinstance(value, (list, tuple)):
                tensors.extend(v for v in value if isinstance(v, torch.Tensor))
            elif isinstance(value, dict):
                tensors.extend(v for v in value.values() if isinstance(v, torch.Tensor))
    return tensors_nbytes(tensors)
