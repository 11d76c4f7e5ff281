"""Measured sensitivity of a model's output to noise in the split-layer hidden state.

The diagonal Fisher ``F_c = E_t E_{y ~ p(.|h)} [(d log p(y|h) / d h_tc)^2]`` gives the second-order
KL of a perturbation ``delta`` of the split hidden state: ``KL ~= 0.5 * sum_c F_c * delta_c^2`` per
scored position, averaged over tokens. :func:`splitkernels.codec.calibrate` allocates precision by
it. Labels are sampled from the model's own distribution (the true Fisher, not the empirical one),
so no text labels are needed.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn


class Fisher(NamedTuple):
    """What :func:`fisher_diagonal` measures."""

    channel: torch.Tensor  # [d] diagonal Fisher per channel, positions >= skip_first, each at its mean trace
    hidden: torch.Tensor  # [N, d] the split hidden states of every window, concatenated
    position: torch.Tensor  # [T] Fisher trace (sum over channels) per position, mean over windows
    token: torch.Tensor  # [N] Fisher trace of each token of ``hidden`` (one label sample: noisy, for per-token-class means)


def fisher_diagonal(model: nn.Module, windows: Iterable[torch.Tensor], split_layer: int, *, skip_first: int = 1,
                    seed: int = 0) -> Fisher:
    """Diagonal Fisher of the split hidden state per channel and per position, and the hidden
    states ``[N, d]`` themselves (:class:`Fisher`).

    ``windows``: token id tensors ``[T]`` (one forward/backward each), each starting a sequence
    (position 0). ``split_layer``: 1-based, the hidden state after that decoder layer. The first
    ``skip_first`` positions of each window (the attention sink, which the codec keeps exact) are
    left out of the channel average, which weighs every position alike (each position's channel
    profile is normalised to its Fisher trace first); the returned hidden states include them
    (:func:`calibrate` detects sinks itself). The per-position trace says how much more an early token's error costs
    (every later token attends to it); ``calibrate`` turns it into position shifts.
    """
    from ..opsc import decoder_layers  # the codec itself does not depend on model code

    layers = decoder_layers(model)
    if not 1 <= split_layer < len(layers):
        raise ValueError(f"split_layer must be in [1, {len(layers) - 1}], got {split_layer}")
    gen = torch.Generator().manual_seed(seed)
    leaf: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        h = hidden.detach().requires_grad_(True)
        leaf.append(h)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    # Squared gradients summed per position and channel over windows (windows may differ in length).
    per_position = torch.zeros(0, 0, dtype=torch.float64)
    seen = torch.zeros(0, dtype=torch.float64)
    states, traces = [], []
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    handle = layers[split_layer - 1].register_forward_hook(hook)
    try:
        for ids in windows:
            leaf.clear()
            with torch.enable_grad():
                logits = model(ids.reshape(1, -1)).logits.float()
                logp = torch.log_softmax(logits, -1)
                y = torch.multinomial(logp.detach().exp()[0], 1, generator=gen)[:, 0]
                loss = -logp[0].gather(-1, y[:, None]).sum()
                (grad,) = torch.autograd.grad(loss, leaf[0])
            sq = grad[0].double().pow(2)
            if sq.shape[0] > seen.shape[0]:
                grow = sq.shape[0] - seen.shape[0]
                per_position = torch.cat([per_position.reshape(-1, sq.shape[1]), sq.new_zeros(grow, sq.shape[1])])
                seen = torch.cat([seen, seen.new_zeros(grow)])
            per_position[: sq.shape[0]] += sq
            seen[: sq.shape[0]] += 1
            states.append(leaf[0].detach()[0])
            traces.append(sq.sum(1).float())
    finally:
        handle.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    if seen.shape[0] <= skip_first:
        raise ValueError("windows must hold at least one window longer than skip_first tokens")
    mean = per_position / seen[:, None]
    trace = mean.sum(1)
    # Each position's channel profile at unit trace, averaged, at the mean trace: the channel
    # shape of a typical token, which a few heavy early positions (their own position shifts
    # take care of them) do not dominate. Separable model F[p, c] = trace[p] * f[c].
    body, body_trace = mean[skip_first:], trace[skip_first:]
    live = body_trace > 0
    shape = (body[live] / body_trace[live, None]).mean(0) if bool(live.any()) else body.mean(0)
    return Fisher((shape * body_trace.mean()).float(), torch.cat(states), trace.float(), torch.cat(traces))


@torch.no_grad()
def split_hidden_states(model: nn.Module, windows: Iterable[torch.Tensor], split_layer: int) -> torch.Tensor:
    """The hidden states ``[N, d]`` after decoder layer ``split_layer`` (1-based) of each window
    ``[T]`` of token ids, concatenated: forward passes only (what a uniform calibration needs)."""
    from ..opsc import decoder_layers

    layers = decoder_layers(model)
    if not 1 <= split_layer < len(layers):
        raise ValueError(f"split_layer must be in [1, {len(layers) - 1}], got {split_layer}")
    states: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        states.append((output[0] if isinstance(output, tuple) else output).detach()[0].float().cpu())

    handle = layers[split_layer - 1].register_forward_hook(hook)
    try:
        for ids in windows:
            model(ids.reshape(1, -1))
    finally:
        handle.remove()
    if not states:
        raise ValueError("windows must hold at least one window")
    return torch.cat(states)
