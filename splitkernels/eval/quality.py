"""Perplexity and model-to-model comparison on sliding windows.

Both take a transformers causal LM or any callable ``fn(input_ids [1, L]) -> logits [1, L, V]``.
Windows follow the usual strided evaluation: each window holds up to ``context`` tokens, windows
start every ``stride`` tokens (``context - 1`` when ``stride == context``, so that every target
has a token before it in its window), and every target token (all but the first) is scored exactly
once, in the first window that reaches it, with as much left context as that window gives.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Union

import torch
from torch import nn

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
ModelLike = Union[nn.Module, LogitsFn]
# Positions per log-softmax chunk: bounds memory at chunk * vocab floats per tensor.
_CHUNK = 256


@dataclass
class QualityReport:
    """A candidate model against a reference on the same scored tokens.

    ``ppl_change`` is relative (0.01 = 1% higher perplexity); ``kl`` is the mean over scored
    tokens of KL(reference || candidate) of the next-token distributions, in nats;
    ``top1_agreement`` is the fraction of tokens where both pick the same most likely token.
    """

    ppl_reference: float
    ppl_candidate: float
    ppl_change: float
    kl: float
    top1_agreement: float
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"ppl {self.ppl_reference:.3f} -> {self.ppl_candidate:.3f} ({100 * self.ppl_change:+.2f}%), "
                f"KL {self.kl:.5f}, top-1 agreement {100 * self.top1_agreement:.2f}% over {self.tokens} tokens")


class _Totals:
    """Running sums for a comparison, so windows of any size combine exactly."""

    def __init__(self) -> None:
        self.nll_ref = self.nll_cand = self.kl = 0.0
        self.agree = self.tokens = 0

    def add(self, ref_logits: torch.Tensor, cand_logits: torch.Tensor, targets: torch.Tensor) -> None:
        for start in range(0, targets.shape[0], _CHUNK):
            sl = slice(start, start + _CHUNK)
            ref = torch.log_softmax(ref_logits[sl].double(), -1)
            cand = torch.log_softmax(cand_logits[sl].double(), -1)
            tgt = targets[sl].unsqueeze(-1)
            self.nll_ref -= float(ref.gather(-1, tgt).sum())
            self.nll_cand -= float(cand.gather(-1, tgt).sum())
            self.kl += float((ref.exp() * (ref - cand)).sum())
            self.agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        self.tokens += targets.shape[0]

    def report(self) -> QualityReport:
        if self.tokens == 0:
            raise ValueError("no tokens were scored (input_ids needs at least 2 tokens)")
        ppl_ref = math.exp(self.nll_ref / self.tokens)
        ppl_cand = math.exp(self.nll_cand / self.tokens)
        return QualityReport(ppl_ref, ppl_cand, ppl_cand / ppl_ref - 1.0, self.kl / self.tokens,
                             self.agree / self.tokens, self.tokens)


def compare_logits(ref_logits: torch.Tensor, cand_logits: torch.Tensor, targets: torch.Tensor) -> QualityReport:
    """Compare next-token logits ``[T, V]`` of two models that predict ``targets [T]`` (already aligned:
    row ``t`` is the distribution for ``targets[t]``)."""
    if ref_logits.dim() != 2 or ref_logits.shape != cand_logits.shape:
        raise ValueError(f"ref_logits and cand_logits must both be [T, V], got {tuple(ref_logits.shape)} "
                         f"and {tuple(cand_logits.shape)}")
    if targets.shape != ref_logits.shape[:1]:
        raise ValueError(f"targets must be [T] = [{ref_logits.shape[0]}], got {tuple(targets.shape)}")
    totals = _Totals()
    totals.add(ref_logits, cand_logits, targets.long())
    return totals.report()


def windows(length: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """``(begin, end, first_target)``: window ``[begin, end)`` scores targets ``first_target..end-1``."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise ValueError(f"context must be an int >= 2, got {context!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= context:
        raise ValueError(f"stride must be an int in [1, context={context}], got {stride!r}")
    scored_to = 1  # token 0 has no left context and is never a target
    # A window starting exactly where the previous one ended could not predict its first token,
    # so stride == context advances by context - 1.
    for begin in range(0, length, min(stride, context - 1)):
        end = min(begin + context, length)
        if end > scored_to:
            yield begin, end, scored_to
            scored_to = end
        if end == length:
            break


def _as_logits_fn(model: ModelLike, name: str) -> LogitsFn:
    if not callable(model):
        raise TypeError(f"{name} must be a model or a callable returning logits, got {type(model).__name__}")
    is_hf = isinstance(model, nn.Module) and hasattr(model, "config")

    def fn(ids: torch.Tensor) -> torch.Tensor:
        out = model(ids, use_cache=False) if is_hf else model(ids)
        return getattr(out, "logits", out)

    return fn


def _check_ids(input_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("input_ids must be an int64 (or int32) tensor of token ids")
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be [L] or [1, L], got shape {tuple(input_ids.shape)}")
    return input_ids.long()


def _scored(fn: LogitsFn, ids: torch.Tensor, begin: int, end: int, first: int, device) -> torch.Tensor:
    """Logits ``[end - first, V]`` predicting tokens ``first..end-1`` from window ``[begin, end)``."""
    logits = fn(ids[begin:end].unsqueeze(0).to(device))
    return logits[0, first - 1 - begin: end - 1 - begin]


def _device(model: ModelLike) -> torch.device:
    if isinstance(model, nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def perplexity(model: ModelLike, input_ids: torch.Tensor, context: int = 1024, stride: int = 512,
               progress: bool = False) -> float:
    """Perplexity of ``input_ids`` (``[L]`` or ``[1, L]``) under ``model`` with sliding windows
    of ``context`` tokens every ``stride`` tokens (module docstring); ``progress`` shows a tqdm bar."""
    from tqdm.auto import tqdm

    ids = _check_ids(input_ids)
    fn, device = _as_logits_fn(model, "model"), _device(model)
    nll, tokens = 0.0, 0
    for begin, end, first in tqdm(list(windows(ids.shape[0], context, stride)), desc="perplexity",
                                  unit="window", disable=not progress):
        logits = _scored(fn, ids, begin, end, first, device).cpu()
        targets = ids[first:end]
        for start in range(0, targets.shape[0], _CHUNK):
            logp = torch.log_softmax(logits[start:start + _CHUNK].double(), -1)
            nll -= float(logp.gather(-1, targets[start:start + _CHUNK].unsqueeze(-1)).sum())
        tokens += targets.shape[0]
    if tokens == 0:
        raise ValueError("no tokens were scored (input_ids needs at least 2 tokens)")
    return math.exp(nll / tokens)


@torch.no_grad()
def compare(reference: ModelLike, candidate: ModelLike, input_ids: torch.Tensor, context: int = 1024,
            stride: int = 512, progress: bool = False) -> QualityReport:
    """Perplexity of both models, KL(reference || candidate) and top-1 agreement on the same
    windows and scored tokens (perplexity alone is too noisy to resolve changes near 1%)."""
    from tqdm.auto import tqdm

    ids = _check_ids(input_ids)
    ref_fn, cand_fn = _as_logits_fn(reference, "reference"), _as_logits_fn(candidate, "candidate")
    ref_dev, cand_dev = _device(reference), _device(candidate)
    totals = _Totals()
    for begin, end, first in tqdm(list(windows(ids.shape[0], context, stride)), desc="compare",
                                  unit="window", disable=not progress):
        ref = _scored(ref_fn, ids, begin, end, first, ref_dev).cpu()
        cand = _scored(cand_fn, ids, begin, end, first, cand_dev).cpu()
        totals.add(ref, cand, ids[first:end])
    return totals.report()
