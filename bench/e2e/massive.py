"""A massive-activation fixture: SmolLM2 with one residual channel scaled by a large factor.

Function-preserving reparametrisation of a pre-norm decoder: the residual stream is multiplied by
``D = diag(1, .., factor at channel c, .., 1)``. Every write into the residual (embedding rows,
attention output and MLP down projections) is multiplied by ``D``, and every read (the RMSNorm
before attention, before the MLP and the final norm) first multiplies by ``D^-1``. The logits are
unchanged up to float rounding, but the hidden state at every split layer carries a channel
``factor`` times its usual magnitude in every token (values beyond the fp16 range at middle
layers for factor 1000), as in models with massive activations. Noise in that channel costs KL
only relative to its own (huge) magnitude, as in those models.
"""
from __future__ import annotations

import torch
from torch import nn

from splitkernels.opsc import decoder_layers


class _PreScaledNorm(nn.Module):
    """``norm(x * inv)``: a norm that reads the reparametrised residual stream."""

    def __init__(self, norm: nn.Module, inv: torch.Tensor) -> None:
        super().__init__()
        self.norm = norm
        self.register_buffer("inv", inv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x * self.inv.to(x.dtype))


@torch.no_grad()
def massive_channel_copy(model: nn.Module, channel: int, factor: float) -> nn.Module:
    """Reparametrise a Llama-style ``model`` in place (see module docstring) and return it."""
    d = model.config.hidden_size
    scale = torch.ones(d)
    scale[channel] = factor
    inv = 1.0 / scale
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:  # tied: the head reads the normed state, keep it
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    model.get_input_embeddings().weight[:, channel] *= factor
    for layer in decoder_layers(model):
        layer.self_attn.o_proj.weight[channel, :] *= factor
        layer.mlp.down_proj.weight[channel, :] *= factor
        layer.input_layernorm = _PreScaledNorm(layer.input_layernorm, inv)
        layer.post_attention_layernorm = _PreScaledNorm(layer.post_attention_layernorm, inv)
    model.model.norm = _PreScaledNorm(model.model.norm, inv)
    return model
