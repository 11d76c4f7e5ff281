"""Verification of drafted tokens on the server and KV cache rollback, for speculative decoding
across the split (the edge's side is :mod:`.speculative`)."""
from __future__ import annotations

from typing import Sequence

import torch

from .protocol import SamplingParams
from .sampling import probabilities
from .segments import Server


def verify_drafts(logits: torch.Tensor, drafts: Sequence[int], params: SamplingParams,
                  generator: torch.Generator | None = None,
                  draft_probs: torch.Tensor | None = None) -> tuple[int, int]:
    """(drafts accepted, the token after them) for ``k = len(drafts)`` drafts.

    ``logits [k+1, V]``: row ``i`` scores the token after draft ``i`` (row 0: after the last
    decided token). Greedy accepts drafts while each equals the argmax and then takes the argmax
    -- exactly greedy decoding. Sampling uses the speculative sampling rule: draft ``x`` drawn
    from ``q`` is accepted with probability ``min(1, p(x) / q(x))``; the first rejected one is
    replaced by a draw from ``max(p - q, 0)`` renormalised; after ``k`` acceptances the next token
    is drawn from ``p``. The output is then distributed as sampling from ``p`` token by token.
    ``draft_probs [k, V]`` is ``q`` per draft; None means deterministic drafts (``q`` a point mass).
    """
    k = len(drafts)
    if logits.ndim != 2 or logits.shape[0] != k + 1:
        raise ValueError(f"logits must be [k+1, V] = [{k + 1}, V] for {k} drafts, got {tuple(logits.shape)}")
    if draft_probs is not None and tuple(draft_probs.shape) != (k, logits.shape[1]):
        raise ValueError(f"draft_probs must be [k, V] = [{k}, {logits.shape[1]}], got {tuple(draft_probs.shape)}")
    if not params.do_sample:
        return greedy_verdict(torch.argmax(logits, dim=-1).tolist(), drafts)
    p = probabilities(logits, params)
    for i, d in enumerate(drafts):
        q_d = 1.0 if draft_probs is None else float(draft_probs[i, d])
        u = float(torch.rand((), generator=generator))
        if q_d > 0 and u * q_d < float(p[i, d]):
            continue
        if draft_probs is None:
            residual = p[i].clone()
            residual[d] = 0.0
        else:
            residual = (p[i] - draft_probs[i].float().cpu()).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: any draw from p is right
            residual = p[i]
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return k, int(torch.multinomial(p[k], 1, generator=generator))


def greedy_verdict(best: Sequence[int], drafts: Sequence[int]) -> tuple[int, int]:
    """(drafts accepted, the token after them) given ``best [k+1]``, the argmax after the last
    decided token and after each draft: drafts are accepted while each equals the argmax."""
    for i, d in enumerate(drafts):
        if best[i] != d:
            return i, best[i]
    return len(drafts), best[len(drafts)]


def enable_rollback(cache) -> None:
    """Let ``cache`` be cut back after a multi-token pass: sliding-window layers otherwise drop the
    states a rollback would need (they then keep them until the next :func:`truncate_cache`)."""
    for layer in cache.layers:
        if hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()


def truncate_cache(cache, length: int) -> None:
    """Cut every filled layer of ``cache`` back to its first ``length`` positions."""
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue  # the other segment's layers
        extra = layer.get_seq_length() - length
        if extra < 0:
            raise ValueError(f"cannot truncate a cache of {layer.get_seq_length()} positions to {length}")
        layer.crop(-extra)  # crop(0) also trims a sliding window back to its working size


def server_verify(server: Server, cache, position: int, hidden: torch.Tensor, drafts: Sequence[int],
                  params: SamplingParams, generator: torch.Generator | None) -> tuple[int, int, int]:
    """Run the server layers on ``hidden [n, d]`` (the last ``len(drafts)`` rows are the drafts) at
    ``position..``, verify, and cut the cache back past the first rejection.

    Returns (accepted, next token, the cache's new length).
    """
    k = len(drafts)
    enable_rollback(cache)
    if params.do_sample:
        logits = server.forward(hidden, cache, position, tail=k + 1)[0]
        accepted, token = verify_drafts(logits, drafts, params, generator)
    else:  # the argmax rows alone (the server's native head where it has one)
        accepted, token = greedy_verdict(server.argmax_tail(hidden, cache, position, k + 1), drafts)
    length = position + hidden.shape[0] - k + accepted
    truncate_cache(cache, length)
    return accepted, token, length
