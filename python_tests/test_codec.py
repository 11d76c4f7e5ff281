"""TS + TAB-Q codec: rules against an independent implementation, error and budget guarantees,
round trips, NaN/Inf policy and bad input."""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitkernels import codec, ops
from splitkernels.codec import CodecConfig

from codec_rules import token_rules

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def llm_like(t: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Activations with heavy channels and a massive first token, like real decoder hidden states."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g)
    heavy = torch.randperm(d, generator=g)[: max(1, d // 100)]
    x[:, heavy] *= 12.0
    x[0] *= 3.0
    x[0, heavy[0]] = 2300.0
    return x.to(dtype)


def check_against_rules(x: torch.Tensor, cfg: CodecConfig) -> None:
    enc = codec.encode(x, cfg)
    raw = ops.reference.raw_width(x.dtype)
    xd = x.double().numpy()
    for t in range(x.shape[0]):
        outl, lo, step, bits, codes = token_rules(
            xd[t], cfg.threshold == "abs", cfg.threshold_value, min(cfg.capacity, x.shape[1]),
            () if cfg.mode == "passthrough" else cfg.bit_choices, cfg.eps, raw,
        )
        cnt = int(enc.num_outliers[t])
        assert enc.outlier_idx[t, :cnt].tolist() == outl, f"token {t}: outlier set"
        assert int(enc.token_bits[t]) == bits, f"token {t}: bit choice"
        if bits != raw:
            assert float(enc.lo[t]) == lo and float(enc.step[t]) == step, f"token {t}: lo/step"
            got = ops.unpack_bits(enc.codes[t : t + 1], bits, x.shape[1])[0].numpy()
            np.testing.assert_array_equal(got, codes, err_msg=f"token {t}: codes")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", [
    CodecConfig(),
    CodecConfig(alpha=3.0, capacity=4, eps=0.1),
    CodecConfig(threshold="abs", tau=2.5, capacity=8, bit_choices=(3, 5), eps=0.05),
    CodecConfig(capacity=0, eps=0.2),
])
def test_rules_on_llm_like_activations(backend, dtype, cfg):
    check_against_rules(llm_like(9, 300, seed=1, dtype=dtype), cfg)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    t=st.integers(1, 5),
    d=st.integers(1, 70),
    seed=st.integers(0, 2**31),
    capacity=st.integers(0, 80),
    alpha=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    eps=st.sampled_from([0.01, 0.05, 0.3]),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_rules_property(t, d, seed, capacity, alpha, eps, dtype, scale):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(t, d, generator=g) * scale).to(dtype)
    # Half-point and tie material: repeated values and integers.
    if d > 3:
        x[0, : d // 2] = torch.round(x[0, : d // 2].float()).to(dtype)
    check_against_rules(x, CodecConfig(alpha=alpha, capacity=capacity, eps=eps))


def test_ties_at_threshold_are_inliers_and_capacity_ties_go_to_lower_channel(backend):
    x = torch.tensor([[2.0, -3.0, 3.0, 1.0, -3.0, 0.5]])
    enc = codec.encode(x, CodecConfig(threshold="abs", tau=2.0, capacity=2, eps=0.5))
    # |x| > 2 strictly: channels 1, 2, 4 (all |3|); capacity 2 keeps the two lowest channels.
    assert enc.outlier_idx[0, : int(enc.num_outliers[0])].tolist() == [1, 2]


def test_all_outlier_and_empty_inlier_rows(backend):
    x = torch.randn(3, 17) + 5.0
    enc = codec.encode(x, CodecConfig(threshold="abs", tau=0.0, capacity=17, eps=0.1))
    assert enc.num_outliers.tolist() == [17, 17, 17]
    assert torch.equal(codec.decode(enc), x)


def test_signed_zero_extremes_give_positive_zero_lo(backend):
    x = torch.tensor([[0.0, -0.0, 1.0, 2.0], [-0.0, 0.0, 3.0, 1.0]])
    enc = codec.encode(x, CodecConfig(capacity=0, eps=0.1))
    assert enc.lo.view(torch.int16).tolist() == [0, 0]


def test_constant_rows_have_zero_step_and_decode_exactly(backend):
    x = torch.full((2, 33), 0.75)
    enc = codec.encode(x, CodecConfig(eps=0.01))
    assert enc.step.tolist() == [0.0, 0.0]
    assert torch.equal(codec.decode(enc), x)


def test_first_token_sink_is_judged_against_its_inliers(backend):
    x = llm_like(4, 576, seed=3)
    enc = codec.encode(x, CodecConfig(capacity=16, eps=0.05))
    # The massive value is a kept outlier (unused slots also hold index 0, so look only at the
    # used ones), and the sink token still needs a real width for its inliers.
    sink = int(x[0].float().abs().argmax())
    kept = enc.outlier_idx[0, : int(enc.num_outliers[0])].tolist()
    assert sink in kept
    assert int(enc.token_bits[0]) > 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [0.02, 0.05, 0.15])
def test_error_mode_respects_eps(backend, dtype, eps):
    x = llm_like(32, 512, seed=5, dtype=dtype)
    enc = codec.encode(x, CodecConfig(eps=eps))
    y = codec.decode(enc).double()
    xd = x.double()
    outlier = torch.zeros_like(xd, dtype=torch.bool)
    for t in range(x.shape[0]):
        outlier[t, enc.outlier_idx[t, : int(enc.num_outliers[t])].long()] = True
    assert torch.equal(y[outlier], xd[outlier]), "outliers travel exactly"
    inl = torch.where(outlier, 0.0, xd)
    err = torch.where(outlier, 0.0, y - xd).norm(dim=1)
    # Max error per element is step/2, so the hard bound is sqrt(3) * eps * ||inliers||; output
    # rounding to a 16-bit dtype adds at most half an ulp per element.
    ulp = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    slack = ulp * inl.abs().max(dim=1).values * math.sqrt(x.shape[1])
    assert (err <= math.sqrt(3) * eps * inl.norm(dim=1) + slack + 1e-12).all()
    # On Gaussian-like tokens the estimate is close to the real error.
    if dtype == torch.float32:
        assert (err / inl.norm(dim=1)).mean() <= 1.1 * eps


@pytest.mark.parametrize("avg_bits", [3.0, 4.25, 5.5])
def test_budget_mode_meets_budget_and_beats_uniform(backend, avg_bits):
    x = llm_like(24, 128, seed=7)
    x[5:9] *= 40.0  # tokens with very different scales: where the budget should go
    enc = codec.encode(x, CodecConfig(mode="budget", avg_bits=avg_bits))
    assert enc.bits_per_element <= avg_bits
    assert len(set(enc.token_bits.tolist())) > 1
    budget_err = (codec.decode(enc) - x).norm()
    # The best single width that fits the same budget is the baseline to beat.
    uniform = [codec.encode(x, CodecConfig(mode="budget", avg_bits=avg_bits, bit_choices=(b,))) for b in (2, 3, 4, 5, 6, 8)]
    best_uniform = max((e for e in uniform if e.bits_per_element <= avg_bits), key=lambda e: int(e.token_bits[0]))
    assert budget_err <= (codec.decode(best_uniform) - x).norm()


def test_budget_too_small_falls_back_to_smallest_width(backend):
    x = llm_like(4, 64, seed=2)
    enc = codec.encode(x, CodecConfig(mode="budget", avg_bits=0.5))
    assert enc.token_bits.tolist() == [2, 2, 2, 2]


@pytest.mark.parametrize("dtype", DTYPES)
def test_passthrough_is_lossless(backend, dtype):
    x = llm_like(5, 97, seed=11, dtype=dtype)
    x[1, 3] = 1e-30 if dtype != torch.float16 else 1e-7
    enc = codec.encode(x, CodecConfig.passthrough())
    y = codec.decode(codec.from_bytes(enc.to_bytes()))
    assert y.dtype == dtype and torch.equal(y, x)


def test_out_of_fp16_range_inliers_travel_raw(backend):
    x = torch.randn(3, 40) * 1e6  # inlier range far beyond fp16
    enc = codec.encode(x, CodecConfig(capacity=2))
    assert enc.token_bits.tolist() == [32, 32, 32]
    assert torch.equal(codec.decode(enc), x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,d", [(1, 1), (1, 576), (7, 13), (0, 8)])
def test_frame_round_trip(backend, dtype, t, d):
    x = torch.randn(t, d).to(dtype)
    enc = codec.encode(x, CodecConfig(alpha=2.0, capacity=3, eps=0.05))
    frame = enc.to_bytes()
    assert len(frame) == enc.nbytes
    back = codec.from_bytes(frame)
    assert torch.equal(codec.decode(back), codec.decode(enc))
    assert back.to_bytes() == frame
    if t:
        assert enc.bits_per_element == 8 * len(frame) / (t * d)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_rejected(bad):
    x = torch.randn(2, 8)
    x[1, 3] = bad
    with pytest.raises(ValueError, match="finite"):
        codec.encode(x)


def test_bad_input_errors_name_the_argument():
    with pytest.raises(TypeError, match="x must have dtype"):
        codec.encode(torch.randint(0, 5, (2, 3)))
    with pytest.raises(ValueError, match="x must be 2-D"):
        codec.encode(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="config"):
        codec.encode(torch.randn(2, 3), {"alpha": 4})
    with pytest.raises(ValueError, match="bit_choices"):
        CodecConfig(bit_choices=(2, 9))
    with pytest.raises(ValueError, match="threshold"):
        CodecConfig(threshold="max")
    with pytest.raises(ValueError, match="tau"):
        CodecConfig(threshold="abs")
    with pytest.raises(ValueError, match="avg_bits"):
        CodecConfig(mode="budget")
    with pytest.raises(ValueError, match="capacity"):
        CodecConfig(capacity=-1)
    with pytest.raises(ValueError, match="eps"):
        CodecConfig(eps=0.0)


def test_config_round_trips_through_dict():
    cfg = CodecConfig(alpha=3.5, capacity=7, bit_choices=(8, 3, 4), mode="budget", avg_bits=4.2)
    assert CodecConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.bit_choices == (3, 4, 8)
