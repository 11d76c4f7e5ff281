"""Sliding-window perplexity, model comparison and the evaluation text."""
from __future__ import annotations

import math

import pytest
import torch

from splitkernels.eval import compare, compare_logits, load_text, perplexity, windows
from splitkernels.models import smollm2_available, tiny_model


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


def position_model(ids: torch.Tensor) -> torch.Tensor:
    """Logits [0, p] at window position p: P(token 1) = sigmoid(p) depends on where the window starts."""
    length = ids.shape[-1]
    logits = torch.zeros(1, length, 2)
    logits[0, :, 1] = torch.arange(length, dtype=torch.float32)
    return logits


def bigram_model(table: torch.Tensor):
    """Logits that depend only on the current token, so any windowing gives the same scores."""
    return lambda ids: table[ids]


def test_windows_known_case_and_every_target_once():
    assert list(windows(6, 4, 2)) == [(0, 4, 1), (2, 6, 4)]
    assert list(windows(5, 8, 4)) == [(0, 5, 1)]
    assert list(windows(7, 4, 4)) == [(0, 4, 1), (3, 7, 4)]  # stride == context steps by context - 1
    for length in (2, 7, 33):
        for context, stride in ((4, 1), (4, 4), (5, 3), (16, 7)):
            scored = [t for _, end, first in windows(length, context, stride) for t in range(first, end)]
            assert scored == list(range(1, length))
            for begin, end, first in windows(length, context, stride):
                assert end - begin <= context and first > begin


def test_perplexity_by_hand():
    ids = torch.ones(6, dtype=torch.long)
    # Window [0, 4) scores targets 1, 2, 3 from positions 0, 1, 2; window [2, 6) scores targets
    # 4 and 5 from its positions 1 and 2.
    nll = -(log_sigmoid(0) + log_sigmoid(1) + log_sigmoid(2) + log_sigmoid(1) + log_sigmoid(2)) / 5
    assert perplexity(position_model, ids, context=4, stride=2) == pytest.approx(math.exp(nll), rel=1e-12)
    # One window: targets from positions 0..4.
    nll = -sum(log_sigmoid(p) for p in range(5)) / 5
    assert perplexity(position_model, ids[None], context=8, stride=8) == pytest.approx(math.exp(nll), rel=1e-12)


def test_perplexity_of_a_bigram_model_is_window_independent():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(11, 11, generator=gen)
    ids = torch.randint(0, 11, (40,), generator=gen)
    logp = torch.log_softmax(table.double(), -1)
    expected = math.exp(-sum(float(logp[ids[t - 1], ids[t]]) for t in range(1, 40)) / 39)
    for context, stride in ((40, 40), (8, 3), (5, 5), (2, 1)):
        assert perplexity(bigram_model(table), ids, context=context, stride=stride) == pytest.approx(expected, rel=1e-9)


def test_perplexity_of_hf_model_matches_its_loss():
    model = tiny_model("llama", seed=1)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert perplexity(model, ids, context=64, stride=32) == pytest.approx(math.exp(float(loss)), rel=1e-5)
    as_fn = perplexity(lambda x: model(x).logits, ids, context=8, stride=4, progress=True)
    assert as_fn == pytest.approx(perplexity(model, ids, context=8, stride=4), rel=1e-9)


def test_compare_by_hand():
    gen = torch.Generator().manual_seed(2)
    ref_table = torch.randn(7, 7, generator=gen)
    cand_table = ref_table + 0.5 * torch.randn(7, 7, generator=gen)
    ids = torch.randint(0, 7, (25,), generator=gen)
    report = compare(bigram_model(ref_table), bigram_model(cand_table), ids, context=6, stride=2)
    p, q = torch.log_softmax(ref_table.double(), -1), torch.log_softmax(cand_table.double(), -1)
    prev, nxt = ids[:-1], ids[1:]
    kl = float((p[prev].exp() * (p[prev] - q[prev])).sum(-1).mean())
    agree = float((p[prev].argmax(-1) == q[prev].argmax(-1)).double().mean())
    ppl_ref = math.exp(-float(p[prev, nxt].mean()))
    ppl_cand = math.exp(-float(q[prev, nxt].mean()))
    assert report.tokens == 24
    assert report.kl == pytest.approx(kl, rel=1e-9) and report.kl > 0
    assert report.top1_agreement == pytest.approx(agree) and agree < 1
    assert report.ppl_reference == pytest.approx(ppl_ref, rel=1e-9)
    assert report.ppl_candidate == pytest.approx(ppl_cand, rel=1e-9)
    assert report.ppl_change == pytest.approx(ppl_cand / ppl_ref - 1, rel=1e-9)
    assert "top-1" in str(report) and report.to_dict()["tokens"] == 24


def test_compare_identical_models_and_compare_logits():
    model = tiny_model("qwen2", seed=3)
    ids = torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(3))
    report = compare(model, model, ids, context=16, stride=8)
    assert report.kl == pytest.approx(0, abs=1e-12) and report.top1_agreement == 1 and report.ppl_change == 0
    logits = torch.randn(300, 9, generator=torch.Generator().manual_seed(4))  # more rows than one chunk
    targets = torch.randint(0, 9, (300,))
    shifted = compare_logits(logits, logits + 1.0, targets)  # a constant shift is the same distribution
    assert shifted.kl == pytest.approx(0, abs=1e-12) and shifted.tokens == 300
    with pytest.raises(ValueError, match="targets"):
        compare_logits(logits, logits, targets[:5])
    with pytest.raises(ValueError, match="cand_logits"):
        compare_logits(logits, logits[:, :5], targets)


def test_bad_arguments():
    ids = torch.ones(10, dtype=torch.long)
    with pytest.raises(ValueError, match="stride"):
        perplexity(position_model, ids, context=4, stride=5)
    with pytest.raises(ValueError, match="context"):
        perplexity(position_model, ids, context=1, stride=1)
    with pytest.raises(TypeError, match="input_ids"):
        perplexity(position_model, ids.float())
    with pytest.raises(ValueError, match="input_ids"):
        perplexity(position_model, ids.reshape(2, 5))
    with pytest.raises(ValueError, match="no tokens"):
        perplexity(position_model, ids[:1])
    with pytest.raises(TypeError, match="candidate"):
        compare(position_model, "model", ids)


def test_load_text():
    text = load_text()
    assert text.startswith("BOTCHAN (MASTER DARLING)") and len(text) > 200_000
    assert "PROJECT GUTENBERG" not in text.upper() and "\ufeff" not in text
    assert "Botchan" in text or "botchan" in text.lower()
    with pytest.raises(ValueError, match="name"):
        load_text("wikitext")


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="SmolLM2 package not installed")
def test_real_model_perplexity_and_opsc():
    from splitkernels.models import load_smollm2
    from splitkernels.nn import QuantConfig
    from splitkernels.opsc import apply_opsc, split_weight_bytes

    model, tokenizer = load_smollm2()
    ids = tokenizer(load_text(), return_tensors="pt").input_ids[0, :257]
    ppl = perplexity(model, ids, context=256, stride=256)
    assert 5 < ppl < 200  # a random model of this vocabulary scores about 55,000
    import copy

    candidate = copy.deepcopy(model)
    dense_front = split_weight_bytes(model, 2)[0]
    report = apply_opsc(candidate, 2, QuantConfig(4, 64), None)
    assert report.front_weight_bytes < dense_front
    quality = compare(model, candidate, ids, context=256, stride=256)
    assert quality.ppl_reference == pytest.approx(ppl, rel=1e-9)
    assert 0 < quality.kl < 0.2 and quality.top1_agreement > 0.8
