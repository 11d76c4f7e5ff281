"""The front door: quantize_ with frozen configs, and quantised models saved and loaded
(safetensors, and transformers' save_pretrained / from_pretrained in a fresh process)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from expect import unavailable
from torch import nn

import splitkernels
from splitkernels import OPSCConfig, QuantConfig, quantize_
from splitkernels.nn import QuantEmbedding, QuantLinear, replace_linear
from splitkernels.opsc import apply_opsc

try:
    import safetensors.torch as safetensors_torch
    import transformers
except ImportError as exc:
    unavailable(f"the model extra is not installed ({exc})")

VOCAB = 96


def tiny_llama(seed: int, tie: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def kinds(model: nn.Module) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}


def test_quant_config_matches_replace_linear():
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    a, b = tiny_llama(0), tiny_llama(0)
    assert quantize_(a, QuantConfig(bits=3, group_size=32)) is a
    replace_linear(b, bits=3, group_size=32, progress=False)
    assert kinds(a) == kinds(b) and len(kinds(a)) == 21  # 7 linears x 3 layers, head dense
    assert torch.equal(logits(a, ids), logits(b, ids))
    assert a.config.quantization_config.modules["model.layers.0.mlp.up_proj"] == {
        "kind": "linear", "bits": 3, "group_size": 32}


def test_filter_fn_and_overrides():
    model = tiny_llama(0)
    quantize_(model, QuantConfig(4, 64), filter_fn=lambda module, name: "mlp" in name,
              overrides={"model.layers.2.*": None, "*.down_proj": QuantConfig(8, 32)})  # first match wins
    got = {n: (m.bits, m.group_size) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    want = {f"model.layers.{i}.mlp.{p}": (8, 32) if p == "down_proj" else (4, 64)
            for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")}
    assert got == want


def test_opsc_config_matches_apply_opsc():
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    config = OPSCConfig(2, front=QuantConfig(2, 32), back=QuantConfig(8, 64), quantize_embedding=True)
    a, b = tiny_llama(0), tiny_llama(0)
    quantize_(a, config)
    apply_opsc(b, 2, QuantConfig(2, 32), QuantConfig(8, 64), quantize_embedding=True)
    assert kinds(a) == kinds(b) and isinstance(a.model.embed_tokens, QuantEmbedding)
    assert torch.equal(logits(a, ids), logits(b, ids))
    assert a.model.layers[1].mlp.up_proj.bits == 2 and a.model.layers[2].mlp.up_proj.bits == 8
    assert OPSCConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_calibrated_configs_take_calibration_ids():
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    calibration = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(4))
    front = QuantConfig(4, 32, method="gptq")
    a, b = tiny_llama(0), tiny_llama(0)
    quantize_(a, OPSCConfig(2, front=front), calibration=calibration)
    apply_opsc(b, 2, front, None, calibration=calibration, progress=False)
    assert torch.equal(logits(a, ids), logits(b, ids))
    c, d = tiny_llama(0), tiny_llama(0)
    quantize_(c, front, calibration=calibration)
    replace_linear(d, 4, 32, progress=False, method="gptq", calibration=calibration)
    assert torch.equal(logits(c, ids), logits(d, ids))
    rtn = tiny_llama(0)
    quantize_(rtn, QuantConfig(4, 32))
    assert not torch.equal(logits(c, ids), logits(rtn, ids))  # the method was not dropped on the way
    with pytest.raises(ValueError, match="calibration"):
        quantize_(tiny_llama(0), front)


def test_calibrated_front_with_fp16_scales():
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(6))
    calibration = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(7))
    model, fp32, dense = tiny_llama(0), tiny_llama(0), logits(tiny_llama(0), ids)
    quantize_(model, OPSCConfig(2, front=QuantConfig(4, 32, method="gptq", scale_dtype="float16")),
              calibration=calibration)
    quantize_(fp32, OPSCConfig(2, front=QuantConfig(4, 32, method="gptq")), calibration=calibration)
    front = [m for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(front) == 14 and all(m.scale.dtype == m.zero.dtype == torch.float16 for m in front)
    # Error feedback makes other code choices once the scales round differently, so the two
    # differ by more than the rounding; each stays as far from the dense model as the other.
    err16, err32 = (float((logits(m, ids) - dense).norm() / dense.norm()) for m in (model, fp32))
    assert err16 < 1.25 * err32


def test_bad_configs_name_the_argument():
    model = tiny_llama(0)
    with pytest.raises(TypeError, match="config must be a QuantConfig or an OPSCConfig"):
        quantize_(model, {"bits": 4})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        quantize_("model", QuantConfig())
    with pytest.raises(ValueError, match="filter_fn and overrides apply to a QuantConfig"):
        quantize_(model, OPSCConfig(1, QuantConfig()), filter_fn=lambda m, n: True)
    with pytest.raises(ValueError, match="split_layer must be a non-negative int"):
        OPSCConfig(-1, QuantConfig())
    with pytest.raises(ValueError, match="quantize_embedding needs a front"):
        OPSCConfig(1, None, QuantConfig(), quantize_embedding=True)
    with pytest.raises(ValueError, match="unknown OPSCConfig keys"):
        OPSCConfig.from_dict({"split_layer": 1, "middle": None})
    with pytest.raises(Exception):
        OPSCConfig(1).split_layer = 2  # frozen


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
def test_scale_dtype_stores_scales_zeros_and_bias_in_it(scale_dtype):
    dtype = getattr(torch, scale_dtype)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    config = QuantConfig(4, 32, scale_dtype=scale_dtype)
    a, b, dense = tiny_gpt2(0), tiny_gpt2(0), tiny_gpt2(0)  # GPT-2's projections carry biases
    quantize_(a, config)
    quantize_(b, QuantConfig(4, 32))
    layers = [m for m in a.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.scale.dtype == m.zero.dtype == m.bias.dtype == dtype for m in layers)
    assert all(m.scale.dtype == torch.float32 for m in b.modules() if isinstance(m, QuantLinear))
    # The same codes as a layer quantised alone with that dtype.
    alone = QuantLinear.from_linear(dense.transformer.h[0].mlp.c_fc, 4, 32, dtype=dtype)
    assert torch.equal(alone.qweight, a.transformer.h[0].mlp.c_fc.qweight)
    assert torch.equal(alone.scale, a.transformer.h[0].mlp.c_fc.scale)
    # The model still computes in fp32, within the 16-bit scales' rounding of the fp32-scale model.
    out, ref = logits(a, ids), logits(b, ids)
    assert out.dtype == torch.float32
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < (2e-2 if scale_dtype == "bfloat16" else 2e-3)
    assert a.config.quantization_config.to_dict()["config"]["scale_dtype"] == scale_dtype
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert "scale_dtype" not in QuantConfig(4, 32).to_dict() and str(config).endswith(f"{scale_dtype} scales")


def test_bad_scale_dtype_names_the_field():
    for bad in ("fp8", torch.float16, "float64"):
        with pytest.raises(ValueError, match="scale_dtype must be None or one of"):
            QuantConfig(4, 32, scale_dtype=bad)
    from splitkernels.hf import SplitkernelsConfig

    spec = {"kind": "linear", "bits": 4, "group_size": 32, "scale_dtype": "int8"}
    with pytest.raises(ValueError, match=r"modules\['m'\]\.scale_dtype must be one of"):
        SplitkernelsConfig(modules={"m": spec})


def test_plain_module_quantizes_without_transformers_metadata():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    quantize_(model, QuantConfig(4, 32))
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], QuantLinear)
    assert not hasattr(model, "config")


def test_safetensors_round_trip_with_tied_embeddings(tmp_path):
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    model = quantize_(tiny_llama(0, tie=True), QuantConfig(4, 32))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the dense head stays tied
    want = logits(model, ids)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_model(model, str(path))
    stored = safetensors_torch.load_file(str(path))
    assert ("lm_head.weight" in stored) != ("model.embed_tokens.weight" in stored)  # one copy of the table
    fresh = quantize_(tiny_llama(1, tie=True), QuantConfig(4, 32))
    assert not torch.equal(logits(fresh, ids), want)
    missing, unexpected = safetensors_torch.load_model(fresh, str(path))
    assert not unexpected and set(missing) <= {"lm_head.weight", "model.embed_tokens.weight"}
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert torch.equal(logits(fresh, ids), want)


_LOAD = textwrap.dedent(
    """
    import json, sys
    import torch
    import splitkernels.hf  # registers the quantization method with transformers
    from transformers import AutoModelForCausalLM
    from splitkernels.nn import QuantEmbedding, QuantLinear
    out = {}
    for d in sys.argv[1:]:
        model = AutoModelForCausalLM.from_pretrained(d).eval()
        ids = torch.load(d + "/ids.pt")
        with torch.no_grad():
            torch.save(model(ids).logits, d + "/got.pt")
        out[d] = {n: [type(m).__name__, m.bits, m.group_size, str(m.scale.dtype)] for n, m in model.named_modules()
                  if isinstance(m, (QuantLinear, QuantEmbedding))}
    print(json.dumps(out))
    """
)


def test_save_pretrained_from_pretrained_in_a_fresh_process(tmp_path):
    ids = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(4))
    cases = {
        "plain": (tiny_llama(0), QuantConfig(4, 32)),
        # A quantised input table with a tied head: the head must come back dense and untied.
        "opsc": (tiny_llama(1), OPSCConfig(2, QuantConfig(3, 32), QuantConfig(8, 64), quantize_embedding=True)),
        "gpt2": (tiny_gpt2(2), QuantConfig(4, 32)),  # Conv1D projections, weight stored [in, out]
        # 16-bit scales, zeros and biases in an fp32 model come back in their own dtype.
        "fp16_scales": (tiny_gpt2(3), QuantConfig(4, 32, scale_dtype="float16")),
    }
    expected = {}
    for name, (model, config) in cases.items():
        quantize_(model, config)
        d = tmp_path / name
        model.save_pretrained(d)
        torch.save(ids, d / "ids.pt")
        saved = json.loads((d / "config.json").read_text())["quantization_config"]
        assert saved["quant_method"] == "splitkernels" and saved["modules"]
        layout = {n: [type(m).__name__, m.bits, m.group_size, str(m.scale.dtype)] for n, m in model.named_modules()
                  if isinstance(m, (QuantLinear, QuantEmbedding))}
        expected[str(d)] = (logits(model, ids), layout)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # cwd: ``python -c`` puts the working directory first on sys.path, and from the repository root
    # that would import the source tree (without its compiled extension) instead of the install.
    run = subprocess.run([sys.executable, "-c", _LOAD, *expected], capture_output=True, text=True, env=env,
                         timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    layouts = json.loads(run.stdout.strip().splitlines()[-1])
    for d, (want, want_layout) in expected.items():
        assert layouts[d] == want_layout
        assert torch.equal(torch.load(os.path.join(d, "got.pt")), want), d
    assert splitkernels.backends()["reference"]["available"]
