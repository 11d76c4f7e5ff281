"""Shared by the session-10 probes: the Fisher trace of every token of some windows at the split."""
import torch
from splitkernels.opsc import decoder_layers


def token_fisher(model, windows, layer: int, samples: int, seed: int = 0):
    """Per-token Fisher trace ``[n_windows * T]`` (float64) of the hidden state after decoder layer
    ``layer`` (1-based), from ``samples`` labels drawn from the model's own distribution (one
    forward and ``samples`` backward passes per window), and those hidden states ``[n_windows * T, d]``."""
    layers = decoder_layers(model)
    leaf = []

    def hook(m, i, o):
        h = (o[0] if isinstance(o, tuple) else o).detach().requires_grad_(True); leaf.append(h)
        return (h, *o[1:]) if isinstance(o, tuple) else h

    for p in model.parameters(): p.requires_grad_(False)
    hd = layers[layer - 1].register_forward_hook(hook)
    gen = torch.Generator().manual_seed(seed)
    F, H = [], []
    try:
        for w in windows:
            leaf.clear()
            with torch.enable_grad():
                logp = torch.log_softmax(model(w[None]).logits.float(), -1)[0]
                probs = logp.detach().exp()
                acc = torch.zeros(w.shape[0], dtype=torch.float64)
                for k in range(samples):
                    y = torch.multinomial(probs, 1, generator=gen)[:, 0]
                    (g,) = torch.autograd.grad(-logp.gather(-1, y[:, None]).sum(), leaf[0], retain_graph=True)
                    acc += g[0].double().pow(2).sum(1)
            F.append(acc / samples); H.append(leaf[0].detach()[0].float())
    finally:
        hd.remove()
    return torch.cat(F), torch.cat(H)
