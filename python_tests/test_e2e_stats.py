"""bench/e2e/stats.py: paired block-bootstrap intervals for perplexity changes, and the
SmoothQuant-style W8A8 baseline module on int8_linear (bench/e2e/baselines.py)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "e2e"))
import stats  # noqa: E402


def _nll(n=1024, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 4


def test_interval_holds_the_point_and_shrinks_with_more_tokens():
    g = torch.Generator().manual_seed(1)
    ref = _nll(4096)
    cand = ref + 0.02 + 0.3 * torch.randn(4096, generator=g)
    point, lo, hi = stats.ppl_change_ci(ref, cand)
    assert lo < point < hi
    assert point == pytest.approx(math.exp(float((cand.double() - ref.double()).mean())) - 1, rel=1e-6)
    _, lo_short, hi_short = stats.ppl_change_ci(ref[:512], cand[:512])
    assert hi - lo < hi_short - lo_short


def test_paired_difference_separates_a_real_gap_from_noise():
    g = torch.Generator().manual_seed(2)
    ref = _nll(2048)
    base = ref + 0.3 * torch.randn(2048, generator=g)
    same = base + 0.01 * torch.randn(2048, generator=g)      # within noise of the baseline
    worse = base + 0.05                                       # 5% perplexity worse, everywhere
    ok, (point, lo, hi) = stats.not_worse(ref, same, base)
    assert ok and lo <= 0.0
    ok, (point, lo, hi) = stats.not_worse(ref, worse, base)
    assert not ok and lo > 0.0 and point == pytest.approx(math.exp(0.05) - 1, rel=0.05)
    assert stats.not_worse(ref, base, worse)[0]  # better is "equal or better"


def test_too_few_tokens_is_an_error():
    with pytest.raises(ValueError, match="two windows"):
        stats.ppl_change_ci(_nll(40), _nll(40, 1))


def test_int8_linear_baseline_matches_its_fake_quantised_reference():
    from baselines import Int8Linear

    from splitkernels.ops import reference

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    smooth = torch.rand(96) + 0.5
    x = torch.randn(3, 96)
    got = Int8Linear(lin, smooth)(x)
    wq, ws = reference.quantize_rows_int8(lin.weight.detach() * smooth)
    want = reference.int8_linear(x / smooth, wq, ws, lin.bias.detach())
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    err = (got - lin(x).detach()).norm() / lin(x).detach().norm()
    assert err < 0.05
