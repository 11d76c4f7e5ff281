"""Drafting on the edge without waiting for the server, and how many drafts to send per round.

Drafters are deterministic functions of the tokens so far (and the split layer's hidden state),
so the draft distribution is a point mass and the server needs only the draft ids to verify:

* :class:`PromptLookupDrafter` continues the latest earlier occurrence of the context's last
  n-gram (free; strong wherever text repeats: code, lists, answers quoting the question);
* :class:`EarlyExitDrafter` applies the model's own final norm and LM head to the split layer's
  hidden state (one LM head product per draft on the edge);
* :class:`ModelDrafter` runs a draft model greedily: any causal LM with the same vocabulary, e.g. a
  low-bit copy of the whole model held by the edge (:func:`low_bit_draft_model`), which agrees with
  the full model far more often than an early exit;
* :class:`ChainDrafter` asks each in turn (prompt lookup first, the early exit where it has nothing).

:class:`DraftPolicy` picks ``k`` per round from the measured acceptance and round costs with the
planner's model (:mod:`splitkernels.planner.speculation`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..planner.speculation import best_draft_length
from .metrics import StepMetrics

NATIVE_FEED_MAX = 16  # tokens a draft model takes in as native one-token steps (more: one eager forward)


class Drafter:
    """Proposes tokens to follow ``context``; ``last_hidden [d]`` is the split layer's output at
    the context's last token, or None when the edge has not run it yet (drafters that need it
    then propose nothing, and are asked again once it exists)."""

    name = "drafter"

    def propose(self, context: Sequence[int], k: int, last_hidden: torch.Tensor) -> list[int]:
        """Up to ``k`` tokens (fewer, or none, when the drafter has no good guess)."""
        raise NotImplementedError

    def prepare(self, context: Sequence[int]) -> None:
        """Called with the prompt in the prefill round, so that a drafter with state (a draft
        model's cache) takes it in there rather than in the first decode round."""


class PromptLookupDrafter(Drafter):
    """Prompt lookup: find the latest earlier occurrence of the context's last ``n`` tokens
    (longest ``n`` from ``max_ngram`` down to ``min_ngram``) and propose what followed it."""

    name = "lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if isinstance(min_ngram, bool) or not isinstance(min_ngram, int) or min_ngram < 1:
            raise ValueError(f"min_ngram must be an int >= 1, got {min_ngram!r}")
        if isinstance(max_ngram, bool) or not isinstance(max_ngram, int) or max_ngram < min_ngram:
            raise ValueError(f"max_ngram must be an int >= min_ngram ({min_ngram}), got {max_ngram!r}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context, k, last_hidden=None):
        ctx = list(context)
        for n in range(min(self.max_ngram, len(ctx) - 1), self.min_ngram - 1, -1):
            suffix = ctx[-n:]
            # Latest start j < len - n whose n tokens equal the suffix (so a continuation exists).
            for j in range(len(ctx) - n - 1, -1, -1):
                if ctx[j] == suffix[0] and ctx[j:j + n] == suffix:
                    return ctx[j + n:j + n + k]
        return []


class EarlyExitDrafter(Drafter):
    """The model's own head (final norm + LM head) on the split layer's hidden state: the greedy
    choice of a model that stopped after the edge's layers. ``head`` maps ``[1, T, d]`` to
    logits ``[1, T, V]`` (an adapter's ``head``)."""

    name = "early-exit"

    def __init__(self, head) -> None:
        if not callable(head):
            raise TypeError(f"head must be callable ([1, T, d] -> [1, T, V] logits), got {type(head).__name__}")
        self.head = head

    @torch.inference_mode()
    def propose(self, context, k, last_hidden):
        if k < 1 or last_hidden is None:
            return []
        return [int(torch.argmax(self.head(last_hidden.reshape(1, 1, -1))[0, -1]))]


class ModelDrafter(Drafter):
    """Greedy continuation by a draft model (a causal LM over the same vocabulary) with its own KV
    cache. Each call reuses the cache for the longest prefix it shares with ``context`` and cuts
    the rest, so rejected drafts need no separate rollback. ``fast``: one-token steps run on the
    native decode path (:mod:`splitkernels.fastpath`) where it covers the draft model
    (``fast_reason`` says why not); prompts always take the model's own forward."""

    name = "draft-model"

    def __init__(self, model: nn.Module, fast: bool = True) -> None:
        from ..fastpath import FastPathUnsupported, NativeDecoder
        from ..models import adapter_for

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a causal LM nn.Module, got {type(model).__name__}")
        self.adapter = adapter_for(model.eval())
        # One-token steps on the native decode path where it covers the model (prompts stay eager).
        self.native: NativeDecoder | None = None
        self.fast_reason: str | None = "the eager path was requested (fast=False)"
        if fast:
            try:
                self.native = NativeDecoder(model, 0, self.adapter.num_layers, head="int8")
                self.fast_reason = None
            except FastPathUnsupported as exc:
                self.fast_reason = str(exc)
        self._tokens: list[int] = []
        self._cache = None
        self._next: int | None = None  # the greedy token after the last one in the cache

    def _new_cache(self):
        eager = lambda: self.adapter.new_cache(0, self.adapter.num_layers)  # noqa: E731
        return self.native.new_cache(eager) if self.native is not None else eager()

    def _feed(self, tokens: list[int]) -> None:
        if self._cache is None:
            self._cache = self._new_cache()
        device = self.adapter.parameter().device
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        if self.native is not None and len(tokens) <= NATIVE_FEED_MAX:
            # A few tokens (a round's accepted drafts and the server's token) cost less as native
            # one-token steps than as one eager forward; prompts go eager.
            embedded = self.native.embed(ids, self._cache.length)[0]
            for row in embedded:
                _, self._next = self.native.step(row, self._cache)
        else:
            cache = self._cache.dynamic() if self.native is not None else self._cache
            self._next = int(torch.argmax(self.adapter.next_logits(ids, cache)))
        self._tokens += tokens

    def _truncate(self, length: int) -> None:
        from .verify import truncate_cache

        if self.native is not None:
            self._cache.truncate(length)
        else:
            truncate_cache(self._cache, length)
        del self._tokens[length:]

    def _rewind(self, context: list[int]) -> None:
        """Keep the cached prefix shared with ``context`` (at most all but its last token), feed the rest."""
        keep = 0
        limit = min(len(self._tokens), len(context))
        while keep < limit and self._tokens[keep] == context[keep]:
            keep += 1
        if keep == len(self._tokens) == len(context):
            return  # the cache and its next token are exactly the context's
        keep = min(keep, len(context) - 1)
        if keep == 0:
            self._cache, self._tokens, self._next = None, [], None
        elif keep < len(self._tokens):
            self._truncate(keep)
        self._feed(context[keep:])

    @torch.inference_mode()
    def prepare(self, context):
        if context:
            self._rewind(list(context))

    @torch.inference_mode()
    def propose(self, context, k, last_hidden=None):
        context = list(context)
        if k < 1 or not context:
            return []
        self._rewind(context)
        drafts: list[int] = []
        while True:
            drafts.append(self._next)
            if len(drafts) == k:
                return drafts
            self._feed(drafts[-1:])


def low_bit_draft_model(model: nn.Module, bits: int = 4, group_size: int = 32) -> nn.Module:
    """A low-bit copy of ``model`` (every linear layer at ``bits``, round to nearest) to draft with."""
    from ..nn import QuantConfig
    from ..quantize import quantize_

    draft = copy.deepcopy(model)
    return quantize_(draft, QuantConfig(bits=bits, group_size=group_size)).eval()


class ChainDrafter(Drafter):
    """The first of ``drafters`` that proposes anything."""

    def __init__(self, *drafters: Drafter) -> None:
        if not drafters or not all(isinstance(d, Drafter) for d in drafters):
            raise TypeError("ChainDrafter needs one or more Drafter objects")
        self.drafters = drafters
        self.name = "+".join(d.name for d in drafters)

    def propose(self, context, k, last_hidden):
        for d in self.drafters:
            tokens = d.propose(context, k, last_hidden)
            if tokens:
                return tokens
        return []

    def prepare(self, context):
        for d in self.drafters:
            d.prepare(context)


@dataclass
class DraftPolicy:
    """How many drafts to send per round.

    ``fixed_k`` set: always that many. Otherwise adaptive: the acceptance rate is estimated from
    the rounds so far (exponentially forgetting with ``decay``), and the round cost as a fixed part
    plus a part per draft, both from the measured step times; ``k`` in ``k_min..k_max`` then
    maximises expected tokens per second (:func:`best_draft_length`). When no drafts pay, every
    ``probe_every``-th round still sends one so the acceptance estimate can recover.
    ``row_transfer_s`` is the link's time for one more row (its bytes over the bandwidth), if known.
    """

    k_max: int = 8
    k_min: int = 0
    probe_every: int = 8
    fixed_k: int | None = None
    decay: float = 0.9
    row_transfer_s: float = 0.0
    k_start: int = 4
    _rounds: int = field(default=0, init=False)
    _accepted: float = field(default=0.0, init=False)
    _rejected: float = field(default=0.0, init=False)
    _fixed_s: float | None = field(default=None, init=False)
    _per_draft_s: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        for name in ("k_max", "k_min", "k_start", "probe_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) must be <= k_max ({self.k_max})")
        if self.fixed_k is not None and (isinstance(self.fixed_k, bool) or not isinstance(self.fixed_k, int)
                                         or self.fixed_k < 0):
            raise ValueError(f"fixed_k must be None or an int >= 0, got {self.fixed_k!r}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay!r}")

    @property
    def acceptance(self) -> float:
        """Estimated probability that a draft is accepted (a prior of one accept, one reject)."""
        return (self._accepted + 1.0) / (self._accepted + self._rejected + 2.0)

    def k(self) -> int:
        """Drafts to send this round."""
        if self.fixed_k is not None:
            return self.fixed_k
        if self._fixed_s is None:
            return min(max(self.k_start, self.k_min), self.k_max)
        best = max(best_draft_length(self.acceptance, self._fixed_s, self._per_draft_s, self.k_max), self.k_min)
        if best == 0 and self.probe_every and self._rounds % self.probe_every == 0:
            return 1
        return best

    def observe(self, drafted: int, accepted: int, step: StepMetrics, draft_s: float) -> None:
        """Learn from one round: ``accepted`` of ``drafted`` drafts and what the round cost."""
        self._rounds += 1
        if drafted:
            self._accepted = self.decay * self._accepted + accepted
            self._rejected = self.decay * self._rejected + (accepted < drafted)
        rows = step.tokens
        per_row_edge = (step.edge_compute_s + step.encode_s + step.decode_s) / rows
        # A batched pass over a few rows costs far less than that many one-row passes: count a
        # quarter of the mean row cost as the server's extra work per draft.
        per_draft = per_row_edge + draft_s / max(drafted, 1) + 0.25 * step.server_compute_s / rows \
            + self.row_transfer_s
        fixed = max(step.total_s - drafted * per_draft, 1e-6)
        if self._fixed_s is None:
            self._fixed_s, self._per_draft_s = fixed, per_draft
        else:
            a = 1.0 - self.decay
            self._fixed_s += a * (fixed - self._fixed_s)
            self._per_draft_s += a * (per_draft - self._per_draft_s)
