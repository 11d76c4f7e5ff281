"""Diagonal Fisher of the split hidden state: shape, and that 0.5 * sum F * delta^2 predicts the KL."""
from __future__ import annotations

import pytest
import torch

from splitkernels.codec.sensitivity import fisher_diagonal
from splitkernels.models import tiny_model
from splitkernels.opsc import decoder_layers


@torch.no_grad()
def _kl_with_noise(model, windows, layer: int, noise_std: torch.Tensor, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)

    def hook(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h + torch.randn(h.shape, generator=g) * noise_std
        return (h, *out[1:]) if isinstance(out, tuple) else h

    kls = []
    for ids in windows:
        ref = torch.log_softmax(model(ids[None]).logits[0], -1)
        handle = decoder_layers(model)[layer - 1].register_forward_hook(hook)
        try:
            cand = torch.log_softmax(model(ids[None]).logits[0], -1)
        finally:
            handle.remove()
        kls.append((ref.exp() * (ref - cand)).sum(-1)[1:])
    return float(torch.cat(kls).mean())


def test_fisher_predicts_kl_of_small_noise():
    model = tiny_model("llama", seed=1, num_layers=3, hidden=32, vocab=64)
    windows = [torch.randint(0, 64, (48,), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    fisher, hidden, position, token = fisher_diagonal(model, windows, 2)
    assert fisher.shape == (32,) and hidden.shape == (6 * 48, 32) and position.shape == (48,) and token.shape == (6 * 48,)
    assert (position >= 0).all() and position.sum() > 0
    # The per-token traces average, window by window, to the per-position trace.
    assert torch.allclose(token.reshape(6, 48).double().mean(0), position.double(), rtol=1e-4)
    assert (fisher >= 0).all() and fisher.sum() > 0
    # Noise on one half of the channels only: the prediction must follow the per-channel weights.
    noise = torch.zeros(32)
    noise[::2] = 0.02 * hidden.std()
    predicted = 0.5 * float((fisher * noise**2).sum())
    measured = _kl_with_noise(model, windows, 2, noise, seed=0)
    assert 0.4 * predicted < measured < 2.5 * predicted, (predicted, measured)


def test_fisher_rejects_bad_layer():
    model = tiny_model("llama", num_layers=2, hidden=32, vocab=64)
    with pytest.raises(ValueError, match="split_layer"):
        fisher_diagonal(model, [torch.arange(8)], 2)
