"""Next-token choice on the server: greedy argmax, or temperature, top-k and top-p sampling."""
from __future__ import annotations

import torch

from .protocol import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator seeded from ``params.seed`` (None for greedy; OS entropy when unseeded)."""
    if not params.do_sample:
        return None
    g = torch.Generator()
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed & 0xFFFF_FFFF_FFFF_FFFF)
    return g


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """Pick a token id from ``logits [V]``.

    Greedy takes the first maximum (as ``torch.argmax`` and a model's ``generate`` do). Sampling
    applies temperature, then keeps the ``top_k`` largest logits, then the smallest set whose
    probability reaches ``top_p`` (always at least the most likely token), and draws from it.
    """
    if logits.ndim != 1 or logits.numel() == 0:
        raise ValueError(f"logits must be a non-empty 1-D tensor, got shape {tuple(logits.shape)}")
    if not params.do_sample:
        return int(torch.argmax(logits))
    return int(torch.multinomial(probabilities(logits, params), 1, generator=generator))


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution :func:`sample` draws from, for each row of ``logits [..., V]`` (fp32, CPU):
    temperature, then top-k, then top-p, as described there. Speculative verification needs it
    as a whole to accept or reject drafted tokens."""
    scores = logits.float().cpu() / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    return torch.softmax(scores, dim=-1)
