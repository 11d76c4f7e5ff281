"""The batched decode step's LM head: the bf16 pass with an exact fp32 fix-up returns the fp32
head's argmax (torch.argmax of the fp32 logits: first maximum on ties), on random data, on
near-ties below bf16's resolution, on exact ties and on non-finite rows."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from splitkernels.runtime.batch_head import BatchHead


def _head(vocab: int, k: int, bias: bool, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, vocab, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(vocab, 1) * 4)  # rows of different norms, as a real vocabulary has
    return lin


@pytest.mark.parametrize("vocab, k, n, bias", [(1, 8, 1, False), (257, 33, 1, False), (1000, 64, 7, True),
                                               (4099, 96, 16, False), (511, 17, 64, True)])
def test_argmax_equals_fp32_head(vocab, k, n, bias):
    lin = _head(vocab, k, bias, seed=vocab + n)
    head = BatchHead(lin)
    x = torch.randn(n, k) * torch.rand(n, 1) * 5
    with torch.no_grad():
        expected = lin(x).argmax(dim=1)
    assert torch.equal(head.argmax(x), expected)
    assert torch.equal(head.logits(x), lin(x).detach())


def test_near_ties_below_bf16_resolution_pick_the_fp32_maximum():
    vocab, k = 300, 48
    lin = _head(vocab, k, False, seed=1)
    head = BatchHead(lin)
    x = torch.randn(8, k)
    with torch.no_grad():
        # Rows 10..17 are the same direction as each x, nudged by 1e-6 relative (bf16 cannot see it);
        # the largest nudge is the fp32 argmax.
        for i in range(8):
            lin.weight[10 + i] = x[i] * 10
            lin.weight[200 + i] = x[i] * 10 * (1 + 1e-6 * (i + 1))
        head = BatchHead(lin)
        expected = lin(x).argmax(dim=1)
    assert expected.tolist() == [200 + i for i in range(8)]
    assert torch.equal(head.argmax(x), expected)


def test_exact_ties_take_the_first_maximum():
    lin = _head(64, 16, False, seed=2)
    with torch.no_grad():
        x = torch.randn(3, 16)
        lin.weight[5] = x[0] * 3
        lin.weight[40] = x[0] * 3  # the same logit as row 5 for x[0]
    head = BatchHead(lin)
    assert int(head.argmax(x[:1])) == 5 == int(lin(x[:1]).argmax(dim=1))


def test_non_finite_rows_fall_back_to_the_fp32_head():
    lin = _head(100, 12, False, seed=3)
    head = BatchHead(lin)
    x = torch.randn(3, 12)
    x[1, 4] = float("nan")
    x[2, 0] = float("inf")
    with torch.no_grad():
        assert torch.equal(head.argmax(x), lin(x).argmax(dim=1))


def test_refuses_non_fp32_heads():
    with pytest.raises(TypeError, match="fp32 nn.Linear"):
        BatchHead(nn.Linear(4, 4).to(torch.bfloat16))
