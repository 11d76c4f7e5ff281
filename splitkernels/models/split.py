"""How a Hugging Face decoder-only model is cut in two: one generic path for every family.

The split never re-implements a family's forward. Each half runs the model's *own* forward on
a view of the model (:func:`~.layout.view_with_layers`) whose decoder-layer list is changed:

* the edge view wraps layer ``l`` so that its output stops the forward (the rest never runs);
  embedding, embedding scaling, learned or rotary positions and masks are the model's own;
* the server view replaces layers ``1..l`` by stand-ins that hand over the received hidden
  state (in the form the real layers return theirs: a tensor, or a tuple), and is fed all-zero
  ``inputs_embeds`` of the right shape; layers ``l+1..L``, the final norm, the LM head and any
  logit soft-capping then run as in the model's own forward.

Each half keeps its own transformers cache, laid out for the whole model by the model's config
(sliding-window, hybrid and linear-attention layers alike). The layers of the other half stay
empty, so each of them is aliased to a layer of the same kind of this half: the model's own
mask and position code, which read the cache's first layers, then see this half's lengths.

A family the generic path cannot run gets its own :class:`Adapter` subclass registered with
:func:`register_adapter` (one file in this package); none is needed so far.
"""
from __future__ import annotations

import inspect
import threading
from typing import Callable

import torch
from torch import nn
from transformers import DynamicCache

from .layout import (
    Trace, UnsupportedModel, decoder_layers, direct_tensors, find_decoder_layers, num_decoder_layers, tensors_nbytes, text_config, trace,
    view_with_layers,
)


class _Slot(threading.local):
    """The hidden state handed to the server's first layer, per thread (sessions run concurrently)."""

    hidden: torch.Tensor | None = None


def _plain_attributes(layer: nn.Module) -> dict[str, object]:
    # Attributes such as ``attention_type`` or ``layer_idx`` that a model's forward may read from
    # each layer of its list before or while calling it.
    return {k: v for k, v in vars(layer).items()
            if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None)))}


class _StandIn(nn.Module):
    """In place of a layer the other half runs: returns the hidden state received at the split, in
    the form the real layer returns its output (``arity``): a tensor (None), or a tuple of that
    many items with the hidden state first, as forwards that take ``outputs[0]`` (Falcon, Bloom,
    MPT) or unpack ``hidden_states, extra = layer(...)`` (Bamba) expect; the other items, which
    a stand-in does not compute, are None."""

    def __init__(self, layer: nn.Module | None, slot: _Slot, arity: int | None = None) -> None:
        super().__init__()
        if layer is not None:  # None: a layer this process has already freed
            self.__dict__.update(_plain_attributes(layer))
        self.__dict__["_slot"] = slot
        self.__dict__["_arity"] = arity

    def forward(self, *args, **kwargs):
        hidden = self._slot.hidden
        return hidden if self._arity is None else (hidden,) + (None,) * (self._arity - 1)


class _Wrapped(nn.Module):
    """Calls ``inner``; attribute reads fall through to it (``attention_type`` and the like)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        params = list(inspect.signature(inner.forward).parameters)
        self.__dict__["_hidden_name"] = params[0] if params else "hidden_states"

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


class _Entry(_Wrapped):
    """The server's first layer: runs on the received hidden state whatever the stand-ins passed on."""

    def __init__(self, inner: nn.Module, slot: _Slot) -> None:
        super().__init__(inner)
        self.__dict__["_slot"] = slot

    def forward(self, *args, **kwargs):
        if args:
            args = (self._slot.hidden, *args[1:])
        else:
            kwargs[self._hidden_name] = self._slot.hidden
        return self.inner(*args, **kwargs)


class _Reached(Exception):
    """Raised to end the model's forward where a view stops it, with the hidden state there: the
    edge's last layer's output (:class:`_Exit`) or the LM head's input (:class:`_HeadInput`)."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("the view's stopping point reached")
        self.hidden = hidden


class _Exit(_Wrapped):
    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        raise _Reached(out[0] if isinstance(out, (tuple, list)) else out)


class _HeadInput(_Wrapped):
    """The LM head of :meth:`Adapter.head_input_view`: hands over its input instead of logits."""

    def forward(self, hidden: torch.Tensor, *args, **kwargs):
        raise _Reached(hidden)


class _Unreached(nn.Module):
    """After the edge's last layer: the forward has already stopped when the loop gets here."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.__dict__.update(_plain_attributes(layer))

    def forward(self, *args, **kwargs):
        raise RuntimeError("the edge ran past its split layer")


class Adapter:
    """A decoder-only causal LM, ready to be cut after any layer; generic for every family.

    ``layers`` is the list of decoder layers (index ``i`` is layer ``i + 1`` in the 1-based
    numbering of the split point: the edge runs ``layers[:split_layer]``).
    """

    family = "generic"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.path, self.layer_list = find_decoder_layers(model)
        self.layers: list[nn.Module | None] = list(self.layer_list[: num_decoder_layers(model.config)])
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed ``past_key_values`` to ``cache``; take whichever the model accepts.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        if self._cache_arg not in params:  # each step would recompute the whole sequence: no split to make
            raise UnsupportedModel(f"{type(model).__name__}.forward takes no KV cache, which each half needs")
        # As generate() does: the LM head on the last position only where the model allows it.
        self._logits_to_keep = "logits_to_keep" in params
        if "inputs_embeds" not in params:
            raise UnsupportedModel(f"{type(model).__name__}.forward takes no inputs_embeds, which the server half needs")
        embedding = model.get_input_embeddings()
        weight = getattr(embedding, "weight", None)
        self.embedding_dim = int(getattr(embedding, "embedding_dim", None) or weight.shape[-1])
        self._slot = _Slot()
        self._arities: list[int | None] = []  # see _output_arities
        self._trace_lock = threading.Lock()
        self._trace_ids: Trace | None = None
        self._pre_embeds: list[nn.Module] = []

    # -- shape ------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        """Width of the hidden state between two decoder layers (what crosses the split)."""
        return int(text_config(self.config).hidden_size)

    @property
    def max_positions(self) -> int | None:
        """Longest sequence the model was built for (``max_position_embeddings``), None if unstated."""
        n = getattr(text_config(self.config), "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    @property
    def vocab_size(self) -> int | None:
        return getattr(text_config(self.config), "vocab_size", None)

    def parameter(self) -> torch.Tensor:
        """Some parameter of the model that is still held (device and dtype of the model)."""
        return next(self.model.parameters())

    # -- caches ----------------------------------------------------------------------------------
    def new_cache(self, first: int, last: int):
        """An empty cache for one sequence through layers ``first..last-1``.

        Laid out for the whole model; each layer of the other half is the same object as a layer
        of this half of the same kind, so the model's own position and mask code (which looks
        at the cache's first layers) sees this half's lengths, and nothing is stored twice.
        """
        cache = DynamicCache(config=self.model.config)
        layers = cache.layers
        if len(layers) >= self.num_layers:
            own = [layers[j] for j in range(first, last)]
            for i in [i for i in range(self.num_layers) if not first <= i < last]:
                kind = (type(layers[i]), getattr(layers[i], "sliding_window", None))
                # A kind this half lacks (say attention, on a half of only recurrent layers) stays an
                # empty layer of its own: none of this half's layers reads it.
                layers[i] = next((o for o in own if (type(o), getattr(o, "sliding_window", None)) == kind), layers[i])
        return cache

    # -- the two halves ----------------------------------------------------------------------------
    def front_view(self, split_layer: int) -> nn.Module:
        """The model running its own forward up to layer ``split_layer``, where it stops."""
        n = self.num_layers
        layers = self.layers[: split_layer - 1] + [_Exit(self.layers[split_layer - 1])] + \
            [_Unreached(self.layers[i]) for i in range(split_layer, n)]
        return view_with_layers(self.model, self.path, layers + list(self.layer_list[n:]))

    def _output_arities(self) -> list[int | None]:
        """Per decoder layer, what it returns: None for a bare tensor, else the length of its tuple
        (a family's forward indexes or unpacks whichever its layers return, so a stand-in must
        return the same), as :meth:`trace_weights` saw it."""
        self.trace_weights()
        return self._arities

    def _stand_in(self, i: int) -> _StandIn:
        return _StandIn(self.layers[i], self._slot, self._output_arities()[i])

    def back_view(self, split_layer: int) -> nn.Module:
        """The model running its own forward from layer ``split_layer + 1`` on a received hidden state."""
        n = self.num_layers
        layers = [self._stand_in(i) for i in range(split_layer)] + \
            [_Entry(self.layers[split_layer], self._slot)] + self.layers[split_layer + 1:]
        return view_with_layers(self.model, self.path, layers + list(self.layer_list[n:]))

    def _call(self, view: nn.Module, cache, **inputs):
        inputs["use_cache"] = cache is not None
        if cache is not None:
            inputs[self._cache_arg] = cache
        return view(**inputs)

    def run_front(self, view: nn.Module, input_ids: torch.Tensor, cache) -> torch.Tensor:
        """Token ids ``[1, T]`` -> output of the split layer ``[1, T, d]`` (appending to ``cache``)."""
        try:
            self._call(view, cache, input_ids=input_ids)
        except _Reached as reached:
            return reached.hidden
        raise RuntimeError(f"{type(self.model).__name__}.forward returned without running its decoder layers")

    def run_back(self, view: nn.Module, hidden: torch.Tensor, cache, last_only: bool,
                 tail: int | None = None, **inputs) -> torch.Tensor:
        """Split-layer output ``[B, T, d]`` -> logits ``[V]`` of the last position (``last_only``),
        of the last ``tail`` positions ``[B, tail, V]`` (``tail`` given), or ``[B, T, V]``, as the
        model's own forward computes them (soft-capping included). ``inputs`` go to that forward
        as they are (``attention_mask``, ``position_ids``: a batched decode over padded caches)."""
        keep = tail if tail is not None else (1 if last_only else None)
        logits = self._run_on(view, hidden, cache, keep, **inputs).logits
        if tail is not None:
            return logits[:, -tail:]
        return logits[0, -1] if last_only else logits

    def _run_on(self, view: nn.Module, hidden: torch.Tensor, cache, keep: int | None, **inputs):
        """The back ``view``'s forward on the split-layer output ``hidden`` (handed to its first
        layer), with the LM head on the last ``keep`` positions where the model allows it."""
        zeros = hidden.new_zeros(*hidden.shape[:-1], self.embedding_dim)
        extra = {"logits_to_keep": keep} if keep is not None and self._logits_to_keep else {}
        self._slot.hidden = hidden
        try:
            return self._call(view, cache, inputs_embeds=zeros, **inputs, **extra)
        finally:
            self._slot.hidden = None

    def head_input_view(self, split_layer: int) -> nn.Module | None:
        """:meth:`back_view` whose LM head hands over its input (:meth:`run_back_to_head`), for a
        head run elsewhere; None where the output embedding is not a child of the model's root."""
        head = self.model.get_output_embeddings()
        name = next((n for n, m in self.model.named_children() if m is head), None) if head is not None else None
        if name is None:
            return None
        view = self.back_view(split_layer)
        view._modules[name] = _HeadInput(head)
        return view

    def run_back_to_head(self, view: nn.Module, hidden: torch.Tensor, cache, tail: int = 1,
                         **inputs) -> torch.Tensor:
        """Split-layer output ``[B, T, d]`` through a :meth:`head_input_view`: the LM head's input
        (after the final norm) for the last ``tail`` positions ``[B, tail, d]``, appending to
        ``cache`` as :meth:`run_back` does (``inputs`` as there)."""
        try:
            self._run_on(view, hidden, cache, tail, **inputs)
        except _Reached as reached:
            return reached.hidden[:, -tail:]
        raise RuntimeError(f"{type(self.model).__name__}.forward returned without calling its LM head module")

    def next_logits(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        """The whole model on ``input_ids [1, T]`` (appending to ``cache`` from :meth:`new_cache`
        over every layer): logits ``[V]`` of the last position."""
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        return self._call(self.model, cache, input_ids=input_ids, **extra).logits[0, -1]

    def head_view(self) -> nn.Module:
        """The model's own forward with every decoder layer handing over a given hidden state:
        only the final norm, the LM head and any soft-capping run (early-exit drafting)."""
        layers = [self._stand_in(i) for i in range(self.num_layers)]
        return view_with_layers(self.model, self.path, layers + list(self.layer_list[self.num_layers:]))

    def head(self, hidden: torch.Tensor, view: nn.Module | None = None) -> torch.Tensor:
        """Last hidden state ``[1, T, d]`` -> logits ``[1, T, V]`` through the model's own head
        (``view``: a :meth:`head_view` to reuse)."""
        return self.run_back(view if view is not None else self.head_view(), hidden, None, last_only=False)

    # -- weights -----------------------------------------------------------------------------------
    def trace_weights(self) -> None:
        """Find which modules each half runs: one forward of one token from ids (the edge's way in)
        and one from ``inputs_embeds`` (the server's), and what each layer returns
        (:meth:`_output_arities`). Kept until :meth:`drop_layers`."""
        with self._trace_lock:
            if self._trace_ids is not None:
                return
            p = self.parameter()
            ids = torch.zeros(1, 1, dtype=torch.long, device=p.device)
            embeds = torch.zeros(1, 1, self.embedding_dim, dtype=p.dtype, device=p.device)
            seen: dict[int, int | None] = {}  # what each layer returned (_output_arities)

            def hook(i: int):
                def record(_module, _args, out) -> None:
                    seen[i] = len(out) if isinstance(out, (tuple, list)) else None
                return record

            handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(self.layers) if layer is not None]
            try:
                with torch.inference_mode():
                    self._trace_ids = trace(self.model, lambda: self.model(input_ids=ids, use_cache=False))
                    self._pre_embeds = trace(self.model, lambda: self.model(inputs_embeds=embeds, use_cache=False)).pre
            finally:
                for handle in handles:
                    handle.remove()
            # A layer the forward did not run takes the form of the first that ran: a family's
            # loop treats every layer's output alike.
            default = next(iter(seen.values()), None)
            self._arities = [seen.get(i, default) for i in range(self.num_layers)]

    def weight_bytes(self, first: int, last: int) -> int:
        """Bytes of the weights a half running layers ``first..last-1`` holds: the modules before
        the layers that it runs (the embedding on the edge; positions on both), its layers and,
        on the last half, everything after them. A tied tensor counts on every side using it."""
        self.trace_weights()
        t = self._trace_ids
        front, back = first == 0, last == self.num_layers
        tensors = t.tensors(first, last, pre=front, post=back)
        if back and not front:
            tensors += [x for m in self._pre_embeds for x in direct_tensors(m)]
        return tensors_nbytes(tensors)

    def drop_layers(self, first: int, last: int) -> None:
        """Free decoder layers ``first..last-1`` (0-based) from the model: a process that runs
        only one half of the split does not keep the other half's weights."""
        self.trace_weights()  # also the stand-ins' form (_output_arities), learnt from the real layers
        for i in range(first, last):
            self.layer_list[i] = nn.Identity()
            self.layers[i] = None
            self._trace_ids.layers[i] = []


_ADAPTERS: dict[str, Callable[[nn.Module], Adapter]] = {}


def register_adapter(model_type: str, factory: Callable[[nn.Module], Adapter]) -> None:
    """Run ``config.model_type`` through ``factory(model)`` (an :class:`Adapter`) instead of the
    generic path; for a family the generic path cannot run."""
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"model_type must be a non-empty string, got {model_type!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable (model -> Adapter), got {type(factory).__name__}")
    _ADAPTERS[model_type] = factory


def supported_families() -> tuple[str, ...]:
    """Model types with their own registered adapter (every other family takes the generic path)."""
    return tuple(sorted(_ADAPTERS))


def adapter_for(model: nn.Module) -> Adapter:
    """The :class:`Adapter` of ``model``: a registered one for its ``config.model_type``, else the
    generic one. TypeError if ``model`` is not a decoder-only causal LM the split can run."""
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "get_input_embeddings", None)):
        raise UnsupportedModel(f"model must be a Hugging Face decoder-only causal LM (a *ForCausalLM), "
                        f"got {type(model).__name__}")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModel(f"model must be decoder-only; {type(model).__name__} is an encoder-decoder model")
    factory = _ADAPTERS.get(getattr(config, "model_type", None), Adapter)
    return factory(model)


__all__ = ["Adapter", "UnsupportedModel", "adapter_for", "register_adapter", "supported_families", "decoder_layers"]
