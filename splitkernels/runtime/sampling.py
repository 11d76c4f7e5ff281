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


# Largest top_k the native head selects itself (csrc/cpu/decode/); a larger one takes the full logits.
FUSED_TOP_K = 256


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """Pick a token id from ``logits [V]``.

    Greedy takes the first maximum (as ``torch.argmax`` and a model's ``generate`` do). Sampling
    applies temperature, then keeps the ``top_k`` largest logits, then the smallest set whose
    probability reaches ``top_p`` (always at least the most likely token), and draws from it.
    With ``top_k`` set the draw is :func:`sample_top` over the ``top_k`` largest logits, so a
    head that selects those itself (the native fast path) draws the same token for the same seed.
    """
    if logits.ndim != 1 or logits.numel() == 0:
        raise ValueError(f"logits must be a non-empty 1-D tensor, got shape {tuple(logits.shape)}")
    if not params.do_sample:
        return int(torch.argmax(logits))
    if 0 < params.top_k < logits.numel():
        values, ids = torch.topk(logits.float().cpu(), params.top_k, sorted=True)
        return sample_top(ids, values, params, generator)
    return int(torch.multinomial(probabilities(logits, params), 1, generator=generator))


def sample_top(ids: torch.Tensor, logits: torch.Tensor, params: SamplingParams,
               generator: torch.Generator | None = None) -> int:
    """Draw from the ``top_k`` candidates ``ids [k]`` with their ``logits [k]``, largest first,
    with the probabilities of :func:`top_probabilities`."""
    if ids.ndim != 1 or ids.shape != logits.shape or ids.numel() == 0:
        raise ValueError(f"ids and logits must be non-empty 1-D tensors of one length, got "
                         f"{tuple(ids.shape)} and {tuple(logits.shape)}")
    return int(ids[torch.multinomial(top_probabilities(logits, params), 1, generator=generator)])


def top_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution over the ``top_k`` largest logits ``[k]`` (largest first): temperature,
    then top-p over them. It equals :func:`probabilities` at those tokens (zero elsewhere), but
    for ties at the k-th logit, which :func:`probabilities` keeps in."""
    scores = logits.float() / params.temperature
    if params.top_p < 1.0:
        scores = _nucleus(scores, params.top_p)
    return torch.softmax(scores, dim=-1)


def _nucleus(sorted_scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """``sorted_scores [..., n]`` (largest first) with -inf where the tokens before already reach
    probability ``top_p``; the first always stays."""
    probs = torch.softmax(sorted_scores, dim=-1)
    return sorted_scores.masked_fill((probs.cumsum(-1) - probs) >= top_p, float("-inf"))


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
        scores = scores.scatter(-1, order, _nucleus(sorted_scores, params.top_p))
    return torch.softmax(scores, dim=-1)
