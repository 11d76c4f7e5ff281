"""Closed-loop calibration (splitkernels.codec.measured): the KL it measures equals an independent
computation, and the recalibration moves the measured KL onto its target."""
from __future__ import annotations

import math

import pytest
import torch

from splitkernels.codec import calibrate, decode, encode
from splitkernels.codec.measured import RATIO_RANGE, calibrate_measured, split_kl
from splitkernels.codec.calibrate import PREDICTION_MIN_SAVING
from splitkernels.codec.sensitivity import fisher_diagonal
from splitkernels.codec.spec import config_for_model
from splitkernels.eval.quality import compare_logits
from splitkernels.models import tiny_model
from splitkernels.opsc import decoder_layers

LAYER = 2


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", seed=3, num_layers=4, hidden=64, vocab=96).eval()
    windows = [torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(10 + i)) for i in range(4)]
    return model, windows, fisher_diagonal(model, windows, LAYER)


@torch.no_grad()
def _kl_by_hand(model, windows, config) -> float:
    """KL over every position through compare_logits, with the codec applied by a hook of its own."""

    def hook(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        y = decode(encode(h[0].float(), config, start=0)).to(h.dtype)[None]
        return (y, *out[1:]) if isinstance(out, tuple) else y

    kl, n = 0.0, 0
    for ids in windows:
        ref = model(ids[None]).logits[0]
        handle = decoder_layers(model)[LAYER - 1].register_forward_hook(hook)
        try:
            cand = model(ids[None]).logits[0]
        finally:
            handle.remove()
        report = compare_logits(ref, cand, ids)  # KL does not depend on the targets
        kl += report.kl * report.tokens
        n += report.tokens
    return kl / n


def test_split_kl_matches_an_independent_computation(setup):
    model, windows, fisher = setup
    coarse = calibrate(fisher.hidden, bits=2.0, sensitivity=fisher.channel, wire_dtype=torch.float32)
    fine = calibrate(fisher.hidden, bits=6.0, sensitivity=fisher.channel, wire_dtype=torch.float32)
    kl_coarse = split_kl(model, windows, LAYER, coarse, torch.float32)
    kl_fine = split_kl(model, windows, LAYER, fine, torch.float32)
    assert kl_coarse == pytest.approx(_kl_by_hand(model, windows, coarse), rel=1e-4)
    assert 0 <= kl_fine < kl_coarse / 4, (kl_fine, kl_coarse)


def test_split_kl_leaves_the_model_unhooked(setup):
    model, windows, fisher = setup
    cfg = calibrate(fisher.hidden, bits=2.0, sensitivity=fisher.channel, wire_dtype=torch.float32)
    before = model(windows[0][None]).logits
    split_kl(model, windows[:1], LAYER, cfg, torch.float32)
    assert torch.equal(model(windows[0][None]).logits, before)


def test_calibrate_measured_meets_its_target_as_measured(setup):
    model, windows, fisher = setup
    target = 0.001
    cfg = calibrate_measured(model, windows, LAYER, fisher, wire_dtype=torch.float32, max_kl=target, bits=6.0, predict=False)
    info = cfg.info
    assert info["kl_target"] == target and RATIO_RANGE[0] <= info["kl_ratio"] <= RATIO_RANGE[1]
    first = calibrate(fisher.hidden, bits=6.0, max_kl_proxy=target, sensitivity=fisher.channel,
                      position_sensitivity=fisher.position, wire_dtype=torch.float32)
    assert info["kl_measured"] == pytest.approx(split_kl(model, windows, LAYER, first, torch.float32), rel=1e-6)
    assert info["kl_ratio"] == pytest.approx(info["kl_measured"] / first.info["kl_proxy"], rel=1e-9)
    # The config is the plain calibration at the corrected proxy target ...
    again = calibrate(fisher.hidden, bits=6.0, max_kl_proxy=target / info["kl_ratio"], sensitivity=fisher.channel,
                      position_sensitivity=fisher.position, wire_dtype=torch.float32)
    assert again.fingerprint == cfg.fingerprint
    # ... and its measured KL is nearer the target than the estimate's step gave (log distance).
    final = split_kl(model, windows, LAYER, cfg, torch.float32)
    assert abs(math.log(final / target)) < 0.5 * abs(math.log(info["kl_measured"] / target)), (final, info)


def test_calibrate_measured_offers_the_token_prediction(setup):
    model, windows, fisher = setup
    cfg = calibrate_measured(model, windows, LAYER, fisher, wire_dtype=torch.float32, max_kl=0.001, bits=6.0)
    tokens, table = torch.cat(list(windows)), model.get_input_embeddings().weight
    again = calibrate(fisher.hidden, bits=6.0, max_kl_proxy=0.001 / cfg.info["kl_ratio"], sensitivity=fisher.channel,
                      position_sensitivity=fisher.position, wire_dtype=torch.float32, tokens=tokens, embedding=table)
    assert again.fingerprint == cfg.fingerprint
    assert (cfg.prediction is not None) == (cfg.info["prediction_saving"] >= PREDICTION_MIN_SAVING)
    kl = split_kl(model, windows, LAYER, cfg, torch.float32)  # sends each window with its ids
    assert 0 <= kl < 10 * 0.001, kl


def test_calibrate_measured_keeps_the_bits_ceiling(setup):
    model, windows, fisher = setup
    cfg = calibrate_measured(model, windows, LAYER, fisher, wire_dtype=torch.float32, max_kl=1e-7, bits=3.0)
    assert cfg.info["estimated_bits"] <= 3.0 + 1e-9


def test_calibrate_measured_rejects_a_bad_target(setup):
    model, windows, fisher = setup
    with pytest.raises(ValueError, match="max_kl"):
        calibrate_measured(model, windows, LAYER, fisher, wire_dtype=torch.float32, max_kl=0)


def test_config_for_model_measures_only_without_bits(setup):
    model, windows, _ = setup
    measured = config_for_model({"kind": "v2", "sensitivity": "fisher"}, model, LAYER, windows, wire_dtype=torch.float32)
    assert "kl_ratio" in measured.info
    estimated = config_for_model({"kind": "v2", "sensitivity": "fisher"}, model, LAYER, windows, wire_dtype=torch.float32,
                                 measure_kl=False)
    fixed = config_for_model({"kind": "v2", "sensitivity": "fisher", "bits": 4.0}, model, LAYER, windows,
                             wire_dtype=torch.float32)
    assert "kl_ratio" not in estimated.info and "kl_ratio" not in fixed.info
