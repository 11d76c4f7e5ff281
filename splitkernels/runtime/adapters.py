"""Per-family adapters: where a Hugging Face decoder-only model keeps its embedding, decoder layers,
position handling, final norm and LM head, and how one decoder layer is called.

The runtime never runs a model's own ``forward``: the edge and the server each run a slice of the
decoder layers with their own KV cache, so each family says how to embed tokens at given
positions, how to call one layer, and how to turn the last hidden state into logits. Adding a
family whose layout matches an existing one is one :func:`register_adapter` call.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

FULL = "full_attention"
SLIDING = "sliding_attention"


class Adapter:
    """The pieces of one decoder-only model, found by family; subclasses say how to call them.

    ``layers`` is the list of decoder layers (index ``i`` is layer ``i + 1`` in the 1-based
    numbering of the split point: the edge runs ``layers[:split_layer]``).
    """

    family = "base"

    def __init__(self, model: nn.Module) -> None:
        self.config = model.config
        self.layers: list[nn.Module | None] = []
        self.layer_list: nn.ModuleList = nn.ModuleList()  # the model's own container of the layers

    def drop_layers(self, first: int, last: int) -> None:
        """Free decoder layers ``first..last-1`` (0-based) from the model: a process that runs
        only one half of the split does not keep the other half's weights."""
        for i in range(first, last):
            self.layer_list[i] = nn.Identity()
            self.layers[i] = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        """Width of the hidden state between two decoder layers (what crosses the split)."""
        return int(self.config.hidden_size)

    @property
    def max_positions(self) -> int | None:
        """Largest sequence length the position scheme supports (None: no hard limit)."""
        return None

    def new_cache(self) -> DynamicCache:
        """An empty KV cache laid out for the whole model; a segment fills only its own layers."""
        return DynamicCache(config=self.config)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[1, T]`` at ``position_ids [1, T]`` -> input of layer 1, ``[1, T, d]``."""
        raise NotImplementedError

    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """Per-step position tensors the layers take (rotary cos/sin), or None."""
        return None

    def layer_type(self, index: int) -> str:
        return FULL

    def masks(self, hidden: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache | None,
              first: int, last: int) -> dict[str, object]:
        """Attention masks for layers ``first..last-1`` keyed by layer type.

        Sized against the first layer of each type *in this segment*: the other segment's layers
        of the shared cache layout stay empty, so the model-wide default (layer 0) would be wrong
        on the server.
        """
        out: dict[str, object] = {}
        for i in range(first, last):
            kind = self.layer_type(i)
            if kind in out:
                continue
            make = create_sliding_window_causal_mask if kind == SLIDING else create_causal_mask
            out[kind] = make(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=cache,
                             position_ids=position_ids, layer_idx=i if cache is not None else None)
        return out

    def call_layer(self, layer: nn.Module, hidden: torch.Tensor, *, mask, position_ids: torch.Tensor,
                   position_embeddings, cache: DynamicCache | None) -> torch.Tensor:
        raise NotImplementedError

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden state after the last layer ``[1, T, d]`` -> logits ``[1, T, V]``."""
        raise NotImplementedError

    def front_modules(self) -> list[nn.Module]:
        """Modules only the edge needs besides its layers (embedding, learned positions)."""
        raise NotImplementedError

    def back_modules(self) -> list[nn.Module]:
        """Modules only the server needs besides its layers (final norm, LM head)."""
        raise NotImplementedError


def _layer_output(out) -> torch.Tensor:
    # Some families return a tuple (hidden, attn weights, ...) from a layer, others the tensor.
    return out[0] if isinstance(out, tuple) else out


class LlamaStyleAdapter(Adapter):
    """``model.model.{embed_tokens, layers, norm, rotary_emb}`` + ``model.lm_head`` with rotary
    positions: Llama, Mistral, Qwen2 and their many look-alikes."""

    family = "llama"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        base = model.model
        self.embed_tokens = base.embed_tokens
        self.rotary = base.rotary_emb
        self.norm = base.norm
        self.lm_head = model.lm_head
        self.layer_list = base.layers
        self.layers = list(base.layers[: self.config.num_hidden_layers])

    def embed(self, input_ids, position_ids):
        return self.embed_tokens(input_ids)

    def position_embeddings(self, hidden, position_ids):
        return self.rotary(hidden, position_ids)

    def layer_type(self, index: int) -> str:
        types = getattr(self.config, "layer_types", None)
        if types:
            return types[index]
        return SLIDING if getattr(self.config, "sliding_window", None) else FULL

    def call_layer(self, layer, hidden, *, mask, position_ids, position_embeddings, cache):
        return _layer_output(layer(hidden, attention_mask=mask, position_ids=position_ids, cache=cache,
                                   use_cache=cache is not None, position_embeddings=position_embeddings))

    def head(self, hidden):
        return self.lm_head(self.norm(hidden))

    def front_modules(self):
        return [self.embed_tokens]

    def back_modules(self):
        return [self.norm, self.lm_head]


class GPT2Adapter(Adapter):
    """GPT-2: learned absolute positions added to the token embedding, ``transformer.h`` blocks."""

    family = "gpt2"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        base = model.transformer
        self.wte, self.wpe, self.drop, self.ln_f = base.wte, base.wpe, base.drop, base.ln_f
        self.lm_head = model.lm_head
        self.layer_list = base.h
        self.layers = list(base.h)

    @property
    def max_positions(self):
        return int(self.config.n_positions)

    def embed(self, input_ids, position_ids):
        return self.drop(self.wte(input_ids) + self.wpe(position_ids))

    def call_layer(self, layer, hidden, *, mask, position_ids, position_embeddings, cache):
        return _layer_output(layer(hidden, cache=cache, attention_mask=mask, use_cache=cache is not None,
                                   position_ids=position_ids))

    def head(self, hidden):
        return self.lm_head(self.ln_f(hidden))

    def front_modules(self):
        return [self.wte, self.wpe]

    def back_modules(self):
        return [self.ln_f, self.lm_head]


class OPTAdapter(Adapter):
    """OPT: learned positions (offset 2), optional input/output projections and final norm."""

    family = "opt"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        dec = model.model.decoder
        self.embed_tokens, self.embed_positions = dec.embed_tokens, dec.embed_positions
        self.project_in, self.project_out = dec.project_in, dec.project_out
        self.final_layer_norm = dec.final_layer_norm
        self.lm_head = model.lm_head
        self.layer_list = dec.layers
        self.layers = list(dec.layers)

    @property
    def max_positions(self):
        return int(self.config.max_position_embeddings)

    def embed(self, input_ids, position_ids):
        h = self.embed_tokens(input_ids)
        if self.project_in is not None:
            h = self.project_in(h)
        # The explicit position ids make the padding mask argument irrelevant; ones keep its shape valid.
        ones = torch.ones(1, int(position_ids[0, -1]) + 1, dtype=torch.long, device=input_ids.device)
        return h + self.embed_positions(ones, 0, position_ids=position_ids).to(h.device)

    def call_layer(self, layer, hidden, *, mask, position_ids, position_embeddings, cache):
        return _layer_output(layer(hidden, attention_mask=mask, position_ids=position_ids, cache=cache,
                                   use_cache=cache is not None))

    def head(self, hidden):
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return self.lm_head(hidden)

    def front_modules(self):
        return [m for m in (self.embed_tokens, self.embed_positions, self.project_in) if m is not None]

    def back_modules(self):
        return [m for m in (self.final_layer_norm, self.project_out, self.lm_head) if m is not None]


_ADAPTERS: dict[str, Callable[[nn.Module], Adapter]] = {
    "llama": LlamaStyleAdapter,
    "mistral": LlamaStyleAdapter,
    "qwen2": LlamaStyleAdapter,
    "gpt2": GPT2Adapter,
    "opt": OPTAdapter,
}


def register_adapter(model_type: str, factory: Callable[[nn.Module], Adapter]) -> None:
    """Support another ``config.model_type``; ``factory(model)`` returns its :class:`Adapter`."""
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"model_type must be a non-empty string, got {model_type!r}")
    _ADAPTERS[model_type] = factory


def supported_families() -> tuple[str, ...]:
    return tuple(sorted(_ADAPTERS))


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s family (by ``config.model_type``); TypeError if unsupported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ADAPTERS:
        raise TypeError(f"model must be a decoder-only causal LM of a supported family {supported_families()}, "
                        f"got model_type {model_type!r} (add one with register_adapter)")
    return _ADAPTERS[model_type](model)
