"""The planner's view of a model: sizes that its memory and latency models need, read from the
model's own modules so that every family is described the same way."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .layout import decoder_layers, text_config


def _linears(layer: nn.Module) -> list[nn.Module]:
    # What OPSC quantises: every nn.Linear of a layer (replace_linear); other weights stay dense.
    return [m for m in layer.modules() if isinstance(m, nn.Linear)]


def _widest(config, name: str):
    """``config.<name>``; where a heterogeneous config keeps it per layer (reading the global value
    raises), the largest of the layers' values, so memory is not under-counted."""
    try:
        return getattr(config, name, None)
    except Exception:
        per_layer = getattr(config, "per_layer_config", None) or ()
        layers = per_layer.values() if isinstance(per_layer, dict) else per_layer
        values = [v for v in (getattr(c, name, None) for c in layers) if v is not None]
        return max(values, default=None)


@dataclass(frozen=True)
class ModelShape:
    """What the cost models need to know about a decoder-only LM.

    ``linears`` are the ``(out, in)`` shapes of the linear layers of one decoder layer (all
    layers alike; for a model whose layers differ, those of its largest layer, so that memory is
    not underestimated); ``layer_other_params`` counts the layer's other parameters (norms,
    biases, fused expert tables), which stay dense; ``dtype_bytes`` is the width of dense weights,
    activations and the KV cache in deployment (2 = fp16); ``outer_params`` counts the parameters
    outside the decoder layers besides the token embedding and the LM head -- learned position
    embeddings and the final norm (None: a final norm of ``hidden``), which the server holds;
    ``position_params`` is the part of them in embedding tables (learned positions), which the
    edge holds too.
    """

    name: str
    num_layers: int
    hidden: int
    vocab: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    linears: tuple[tuple[int, int], ...]
    layer_other_params: int
    tied_embeddings: bool = True
    dtype_bytes: int = 2
    outer_params: int | None = None
    position_params: int = 0

    @classmethod
    def from_model(cls, model: nn.Module, name: str | None = None, dtype_bytes: int = 2) -> ModelShape:
        """From a Hugging Face decoder-only causal LM of any family (real or on the meta device)."""
        config = text_config(model.config)
        layer = max(decoder_layers(model), key=lambda m: sum(p.numel() for p in m.parameters()))
        linears = tuple((int(m.out_features), int(m.in_features)) for m in _linears(layer))
        total = sum(p.numel() for p in layer.parameters())
        other = total - sum(n * k for n, k in linears)
        h = int(config.hidden_size)
        heads = int(_widest(config, "num_attention_heads") or 1)
        kv = int(_widest(config, "num_key_value_heads") or heads)
        hd = int(_widest(config, "head_dim") or h // heads)
        tied = getattr(model.config, "tie_word_embeddings", None)
        if tied is None:
            tied = getattr(config, "tie_word_embeddings", False)
        seen = {id(p) for layer_ in decoder_layers(model) for p in layer_.parameters()}
        for m in (model.get_input_embeddings(), model.get_output_embeddings()):
            seen |= {id(p) for p in (m.parameters() if m is not None else ())}
        outer = sum(p.numel() for p in model.parameters() if id(p) not in seen)
        positions = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding)
                        for p in m.parameters(recurse=False) if id(p) not in seen)
        return cls(
            name=name or getattr(model.config, "name_or_path", "") or model.config.model_type,
            num_layers=len(decoder_layers(model)), hidden=h, vocab=int(config.vocab_size), num_heads=heads,
            num_kv_heads=kv, head_dim=hd, linears=linears, layer_other_params=int(other),
            tied_embeddings=bool(tied), dtype_bytes=dtype_bytes, outer_params=int(outer),
            position_params=int(positions),
        )

    @classmethod
    def from_config(cls, config, name: str | None = None, dtype_bytes: int = 2) -> ModelShape:
        """From a Hugging Face config of any decoder-only family: the model is built on the meta
        device (no memory, no weights) and measured as :meth:`from_model` does."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls.from_model(model, name, dtype_bytes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["linears"] = [list(x) for x in self.linears]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelShape:
        return cls(**{**d, "linears": tuple(tuple(x) for x in d["linears"])})

    @property
    def outer(self) -> int:
        """Parameters outside the layers, embedding and head (:attr:`outer_params`, else a final norm)."""
        return self.hidden if self.outer_params is None else self.outer_params

    @property
    def layer_params(self) -> int:
        return sum(n * k for n, k in self.linears) + self.layer_other_params

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes
