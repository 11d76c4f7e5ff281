"""Confidence intervals for perplexity changes: a paired block bootstrap over windows of scored tokens.

Every method is scored on the same tokens, so differences are paired: each bootstrap replicate
draws windows of ``window`` consecutive scored tokens with replacement (the same windows for every
method) and recomputes the perplexity changes from the per-token negative log-likelihoods.
Windows, not single tokens, are resampled because neighbouring tokens' losses are correlated.
"""
from __future__ import annotations

import math

import torch

WINDOW = 32
REPLICATES = 2000
LEVEL = 0.95


def _windows(n: int, window: int) -> torch.Tensor:
    if n < 2 * window:
        raise ValueError(f"need at least two windows of {window} scored tokens, got {n}")
    return torch.arange(n // window * window).reshape(-1, window)


def _draws(count: int, replicates: int, seed: int) -> torch.Tensor:
    return torch.randint(0, count, (replicates, count), generator=torch.Generator().manual_seed(seed))


def ppl_change_ci(reference_nll, nll, window: int = WINDOW, replicates: int = REPLICATES, seed: int = 0,
                  level: float = LEVEL) -> tuple[float, float, float]:
    """(point estimate, low, high) of exp(mean nll - mean reference nll) - 1 over the scored tokens."""
    return diff_ci(reference_nll, nll, None, window, replicates, seed, level)


def diff_ci(reference_nll, a_nll, b_nll=None, window: int = WINDOW, replicates: int = REPLICATES, seed: int = 0,
            level: float = LEVEL) -> tuple[float, float, float]:
    """(point, low, high) of ppl_change(a) - ppl_change(b) (b None: of ppl_change(a) alone), with the
    same resampled windows for both: a percentile interval at ``level``."""
    ref = torch.as_tensor(reference_nll, dtype=torch.float64)
    a = torch.as_tensor(a_nll, dtype=torch.float64)
    b = None if b_nll is None else torch.as_tensor(b_nll, dtype=torch.float64)
    idx = _windows(ref.numel(), window)
    sums = [x[idx].sum(1) for x in (ref, a) + (() if b is None else (b,))]
    draws = _draws(idx.shape[0], replicates, seed)
    tokens = idx.shape[0] * window

    def change(total_ref: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        return torch.exp((total - total_ref) / tokens) - 1.0

    full = [s.sum() for s in sums]
    boot = [s[draws].sum(1) for s in sums]
    point = change(full[0], full[1]) - (0.0 if b is None else change(full[0], full[2]))
    reps = change(boot[0], boot[1]) - (0.0 if b is None else change(boot[0], boot[2]))
    q = torch.quantile(reps, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(point), float(q[0]), float(q[1])


def not_worse(reference_nll, ours_nll, base_nll, **kw) -> tuple[bool, tuple[float, float, float]]:
    """Ours is "equal or better" than the baseline unless the whole interval of
    ppl_change(ours) - ppl_change(base) lies above zero (worse beyond the noise)."""
    d = diff_ci(reference_nll, ours_nll, base_nll, **kw)
    return not d[1] > 0.0, d


def fmt_ci(ci: tuple[float, float, float]) -> str:
    """``+0.12% [-0.30, +0.51]`` for a (point, low, high) of relative changes."""
    point, lo, hi = ci
    if any(math.isnan(v) for v in ci):
        return "n/a"
    return f"{100 * point:+.2f}% [{100 * lo:+.2f}, {100 * hi:+.2f}]"
