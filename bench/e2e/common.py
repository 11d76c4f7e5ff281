"""Shared inputs of the end-to-end benchmarks: the evaluation tokens and split layers."""
from __future__ import annotations

import torch

from splitkernels.eval import load_text

SPLIT_LAYERS = (4, 10, 15, 22)
CONTEXT = 512
TOKENS = 2048


def botchan_ids(tokenizer, tokens: int = TOKENS) -> torch.Tensor:
    """The first ``tokens`` tokens of Botchan (the project's evaluation text)."""
    return tokenizer(load_text("botchan"), return_tensors="pt").input_ids[0, :tokens]
