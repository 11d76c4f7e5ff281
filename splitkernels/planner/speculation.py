"""Speculative decoding across the split, as a cost model: expected tokens per round trip and the
best number of drafts ``k`` for a measured acceptance rate and link.

A round sends the last decided token plus ``k`` drafted ones; the server accepts a prefix of the
drafts and adds its own next token. With each draft accepted independently with probability
``alpha`` (the usual modelling assumption), a round yields ``(1 - alpha**(k+1)) / (1 - alpha)``
tokens. Its cost is a fixed part (round trip, the server's pass over one row, the reply) plus a
part per draft (drafting and front layers on the edge, the row's bytes, the server's extra row).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..nn import QuantConfig
from .costs import MESSAGE_OVERHEAD_BYTES, REPLY_BYTES, ComputeModel, LatencyEstimate, ModelShape, layer_weight_bytes


def _check_alpha(alpha: float) -> float:
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be an acceptance probability in [0, 1], got {alpha!r}")
    return float(alpha)


def _check_k(k: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"{name} must be an int >= 0, got {k!r}")
    return k


def expected_tokens_per_round(alpha: float, k: int) -> float:
    """Tokens one round yields with ``k`` drafts each accepted with probability ``alpha``
    (the accepted prefix plus the server's own token): 1 at ``k = 0``, ``k + 1`` at ``alpha = 1``."""
    alpha, k = _check_alpha(alpha), _check_k(k)
    if alpha == 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def tokens_per_second(alpha: float, k: int, fixed_s: float, per_draft_s: float) -> float:
    """Throughput of rounds costing ``fixed_s + k * per_draft_s`` seconds."""
    if not (fixed_s > 0 and per_draft_s >= 0 and math.isfinite(fixed_s) and math.isfinite(per_draft_s)):
        raise ValueError(f"fixed_s must be > 0 and per_draft_s >= 0 (finite), got {fixed_s!r}, {per_draft_s!r}")
    return expected_tokens_per_round(alpha, k) / (fixed_s + k * per_draft_s)


def best_draft_length(alpha: float, fixed_s: float, per_draft_s: float, k_max: int) -> int:
    """The ``k`` in ``0..k_max`` with the most tokens per second (the smallest on ties)."""
    _check_k(k_max, "k_max")
    rates = [tokens_per_second(alpha, k, fixed_s, per_draft_s) for k in range(k_max + 1)]
    return max(range(k_max + 1), key=lambda k: (rates[k], -k))


def round_costs(lat: LatencyEstimate, server_row_fraction: float = 0.25) -> tuple[float, float]:
    """(fixed seconds per round, seconds per draft) of a split deployment (``lat`` from
    :func:`split_latency`) that sends drafts.

    Each draft adds the edge's per-token work, its frame bytes on the link and, on the server,
    ``server_row_fraction`` of a one-row pass (a batched pass over a few rows is memory bound, so
    an extra row costs a fraction of the first); the round trip and the reply are paid once.
    Drafting itself (prompt lookup, or the early-exit head) is counted in the edge's per-token work
    only approximately -- the runtime measures the real costs and adapts ``k``.
    """
    if not 0.0 <= server_row_fraction <= 1.0:
        raise ValueError(f"server_row_fraction must be in [0, 1], got {server_row_fraction!r}")
    # transfer_s covers the step message and the reply; a draft adds only its frame row.
    frame_share = max(lat.token_bytes - MESSAGE_OVERHEAD_BYTES - REPLY_BYTES, 0) / max(lat.token_bytes, 1)
    per_draft = lat.edge_s + lat.encode_s + lat.decode_s + lat.transfer_s * frame_share \
        + server_row_fraction * lat.server_s
    return lat.token_s, per_draft


def speculative_token_s(lat: LatencyEstimate, alpha: float, k: int, server_row_fraction: float = 0.25) -> float:
    """Seconds per generated token with ``k`` drafts per round at acceptance ``alpha`` (costs as in
    :func:`round_costs`)."""
    fixed, per_draft = round_costs(lat, server_row_fraction)
    return (fixed + _check_k(k) * per_draft) / expected_tokens_per_round(alpha, k)


@dataclass(frozen=True)
class DraftOption:
    """A way to draft on the edge: its measured per-draft ``acceptance``, the edge seconds it
    adds per draft besides the front layers (``draft_s``: a draft model's whole pass, the
    early exit's head, 0 for prompt lookup) and the edge memory it holds (``edge_bytes``)."""

    name: str
    acceptance: float
    draft_s: float = 0.0
    edge_bytes: int = 0

    def __post_init__(self) -> None:
        _check_alpha(self.acceptance)
        if not (math.isfinite(self.draft_s) and self.draft_s >= 0):
            raise ValueError(f"draft_s must be a finite number >= 0, got {self.draft_s!r}")


@dataclass(frozen=True)
class SpeculationChoice:
    """What :func:`choose_speculation` picked: ``drafter`` None (one token per round trip) or a
    :class:`DraftOption` name, ``k`` drafts per round and the modelled seconds per token."""

    drafter: str | None
    k: int
    token_s: float
    tokens_per_round: float


def draft_model_option(shape: ModelShape, edge: ComputeModel, bits: int, acceptance: float, context: int,
                       group_size: int = 32) -> DraftOption:
    """A ``bits``-bit copy of the whole model (group ``group_size``) as the edge's draft model:
    every layer and the head once per draft, its weights held on the edge."""
    quant = QuantConfig(bits=bits, group_size=group_size)
    draft_s = shape.num_layers * edge.layer_s(quant, 1, context) + edge.head_s(1)
    edge_bytes = shape.num_layers * layer_weight_bytes(shape, quant) + shape.vocab * shape.hidden
    return DraftOption(f"draft-model {bits}-bit", acceptance, draft_s, edge_bytes)


def choose_speculation(lat: LatencyEstimate, options: Sequence[DraftOption], k_max: int = 8,
                       edge_bytes_free: int | None = None, server_row_fraction: float = 0.25) -> SpeculationChoice:
    """The drafter and ``k`` (up to ``k_max``) with the fewest modelled seconds per token for a
    split whose one-token-per-round-trip costs are ``lat``, or no speculation when none pays.
    Options needing more edge memory than ``edge_bytes_free`` are skipped."""
    best = SpeculationChoice(None, 0, lat.token_s, 1.0)
    fixed, per_draft = round_costs(lat, server_row_fraction)
    for option in options:
        if edge_bytes_free is not None and option.edge_bytes > edge_bytes_free:
            continue
        k = best_draft_length(option.acceptance, fixed, per_draft + option.draft_s, k_max)
        if k == 0:
            continue
        tokens = expected_tokens_per_round(option.acceptance, k)
        token_s = (fixed + k * (per_draft + option.draft_s)) / tokens
        if token_s < best.token_s:
            best = SpeculationChoice(option.name, k, token_s, tokens)
    return best
