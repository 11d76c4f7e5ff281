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

from .costs import MESSAGE_OVERHEAD_BYTES, REPLY_BYTES, LatencyEstimate


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
