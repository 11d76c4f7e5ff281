"""Closed-loop calibration: the codec's KL measured through the model, not only estimated.

:func:`~splitkernels.codec.calibrate` sets the step from a second-order estimate of the KL (the
diagonal Fisher of the split hidden state times the quantisation noise). How far the true KL lies
from it is a property of the model and split layer: 0.95-1.17x on SmolLM2-135M and Gemma 3 270M
(2.1-2.5x at Gemma 3 split 2 before its token prediction; bench/results/codec_v2/README.md). A model family the
defaults were not tuned on may lie further still, so :func:`calibrate_measured` runs the
calibration windows once through the model with the codec at the split, measures the KL to the
unsplit model's next-token distributions, and recalibrates with the proxy target divided by the
measured ratio: the step then meets the KL target as measured, within the same bits ceiling.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .calibrate import CEILING, DEFAULT_KL_PROXY, calibrate
from .config_v2 import CodecConfigV2
from .predict import embedding_table, table_for
from .sensitivity import Fisher

# The measured / estimated ratio is clipped to this range (one pass over a few windows: a ratio
# far outside it says more about those windows than about the model).
RATIO_RANGE = (0.25, 8.0)
_KL_CHUNK = 64  # positions per log-softmax chunk: bounds memory at 64 x vocab floats per tensor


def _kl_sum(ref_logits: torch.Tensor, cand_logits: torch.Tensor) -> float:
    """Sum over rows of KL(softmax(ref) || softmax(cand)) in nats, for logits ``[T, V]``."""
    total = 0.0
    for start in range(0, ref_logits.shape[0], _KL_CHUNK):
        ref = torch.log_softmax(ref_logits[start : start + _KL_CHUNK].float(), -1)
        cand = torch.log_softmax(cand_logits[start : start + _KL_CHUNK].float(), -1)
        total += float((ref.exp() * (ref - cand)).sum(-1).double().sum())
    return total


@torch.no_grad()
def split_kl(model: nn.Module, windows: Sequence[torch.Tensor], split_layer: int, config: CodecConfigV2,
             wire_dtype: torch.dtype) -> float:
    """Mean KL (nats per position) of the next-token distributions with the split hidden state
    sent through ``config`` (in ``wire_dtype``) against the unsplit model, over every position of
    ``windows`` (token id tensors ``[T]``, each starting a sequence at position 0). A config with a
    prediction codes with the model's input embedding table and each window's ids."""
    from ..opsc import decoder_layers  # the codec itself does not depend on model code
    from .dispatch import decode, encode

    layers = decoder_layers(model)
    if not 1 <= split_layer < len(layers):
        raise ValueError(f"split_layer must be in [1, {len(layers) - 1}], got {split_layer}")
    active: list = [None]  # the ids of the window whose forward pass sends through the codec
    table = table_for(config.prediction, model)

    def hook(_module, _inputs, output):
        if active[0] is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        enc = encode(hidden[0].to(wire_dtype), config, start=0, tokens=active[0], embedding=table)
        sent = decode(enc, embedding=table).to(hidden.dtype)[None]
        return (sent, *output[1:]) if isinstance(output, tuple) else sent

    total, positions = 0.0, 0
    handle = layers[split_layer - 1].register_forward_hook(hook)
    try:
        for ids in windows:
            ids = ids.reshape(1, -1)
            active[0] = None
            ref = model(ids).logits[0]
            active[0] = ids[0]
            cand = model(ids).logits[0]
            active[0] = None
            total += _kl_sum(ref, cand)
            positions += ids.shape[1]
    finally:
        handle.remove()
    if positions == 0:
        raise ValueError("windows must hold at least one token")
    return total / positions


def calibrate_measured(model: nn.Module, windows: Sequence[torch.Tensor], split_layer: int, fisher: Fisher, *,
                       wire_dtype: torch.dtype, max_kl: float = DEFAULT_KL_PROXY, bits: float | None = None,
                       predict: bool = True) -> CodecConfigV2:
    """:func:`calibrate` with the Fisher of ``windows`` (``fisher``, from
    :func:`~splitkernels.codec.sensitivity.fisher_diagonal` on the same windows) aiming at a
    *measured* KL of ``max_kl`` on those windows within ``bits`` (default: the decode-frame
    ceiling :func:`default_bits_ceiling`). One measurement at the estimate's step gives the ratio of
    measured to estimated KL; the config is then recalibrated with the estimate's target divided by
    it. ``info`` records ``kl_measured`` (at the first step), ``kl_ratio`` and ``kl_target``.
    ``predict``: offer :func:`calibrate` the windows' ids and the model's input embedding table
    (a token prediction where it pays; the runtime then needs both ends to hold that table)."""
    if not (isinstance(max_kl, (int, float)) and max_kl > 0):
        raise ValueError(f"max_kl must be a number > 0, got {max_kl!r}")
    ceiling = CEILING if bits is None else bits
    table = embedding_table(model, fisher.hidden.shape[1]) if predict else None
    tokens = None if table is None else torch.cat([w.reshape(-1) for w in windows])
    if tokens is not None and tokens.shape[0] != fisher.hidden.shape[0]:
        raise ValueError(f"fisher holds {fisher.hidden.shape[0]} hidden states, windows {tokens.shape[0]} tokens")

    def fit(target: float) -> CodecConfigV2:
        return calibrate(fisher.hidden, bits=ceiling, max_kl_proxy=target, sensitivity=fisher.channel,
                         position_sensitivity=fisher.position, wire_dtype=wire_dtype, tokens=tokens, embedding=table,
                         token_sensitivity=fisher.token)

    first = fit(max_kl)
    measured = split_kl(model, windows, split_layer, first, wire_dtype)
    estimate = first.info["kl_proxy"]
    ratio = min(RATIO_RANGE[1], max(RATIO_RANGE[0], measured / estimate)) if estimate > 0 and math.isfinite(measured) else 1.0
    config = fit(max_kl / ratio)
    config.info.update(kl_measured=measured, kl_measured_proxy=estimate, kl_ratio=ratio, kl_target=max_kl)
    return config
