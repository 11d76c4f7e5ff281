"""QuantLinear, QuantEmbedding, QuantConfig and replace_linear."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from splitkernels import backends, use_backend
from splitkernels.models import FAMILIES, tiny_model
from splitkernels.nn import QuantConfig, QuantEmbedding, QuantLinear, replace_linear
from splitkernels.nn.linear import is_conv1d

CPU_LOWBIT_BACKENDS = [
    name for name, info in backends().items()
    if info["available"] and "lowbit_linear" in info["ops"] and ("cpu" in info["devices"] or "*" in info["devices"])
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().float(), ref.detach().float()
    return float((out - ref).norm() / ref.norm())


def linear_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}


def quant_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------- QuantLinear


@pytest.mark.parametrize("backend", CPU_LOWBIT_BACKENDS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k,group,m", [(13, 96, 32, 1), (7, 64, 64, 5), (40, 128, -1, 3), (1, 32, 32, 2)])
def test_quantlinear_matches_dense_on_dequantised_weight(backend, bits, n, k, group, m):
    torch.manual_seed(bits * 1000 + n)
    dense = nn.Linear(k, n, bias=n % 2 == 1)
    layer = QuantLinear.from_linear(dense, bits=bits, group_size=group)
    assert layer.group_size == (k if group == -1 else group)
    x = torch.randn(2, m, k)
    with use_backend(backend):
        out = layer(x)
    ref = nn.functional.linear(x, layer.dequantize(torch.float32), layer.bias)
    assert out.shape == (2, m, n) and out.dtype == x.dtype
    assert rel_err(out, ref) < 1e-5
    # The layer still computes roughly the original linear; 8 bits closely.
    assert rel_err(out, dense(x)) < {2: 0.6, 3: 0.3, 4: 0.15, 8: 0.01}[bits]


def test_quantlinear_empty_batch_and_half_activations():
    torch.manual_seed(1)
    layer = QuantLinear.from_linear(nn.Linear(64, 24), bits=4, group_size=32)
    assert layer(torch.randn(0, 64)).shape == (0, 24)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    ref = nn.functional.linear(x.float(), layer.dequantize(torch.float32), layer.bias)
    assert rel_err(out, ref) < 1e-2


def test_quantlinear_from_conv1d_transposes():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(2)
    conv = Conv1D(48, 64)  # nf=48 outputs, nx=64 inputs; weight [64, 48]
    nn.init.normal_(conv.bias)
    layer = QuantLinear.from_linear(conv, bits=8, group_size=32)
    assert (layer.in_features, layer.out_features) == (64, 48)
    x = torch.randn(5, 64)
    assert rel_err(layer(x), conv(x)) < 0.01


def test_quantlinear_dtype_sets_scale_dtype_and_repr():
    layer = QuantLinear.from_linear(nn.Linear(64, 16), bits=3, group_size=32, dtype=torch.float16)
    assert layer.scale.dtype == layer.zero.dtype == layer.bias.dtype == torch.float16
    assert layer.qweight.dtype == torch.int32 and layer.qweight.shape == (16, 6)  # 64 * 3 / 32 words
    assert layer.extra_repr() == "in_features=64, out_features=16, bias=True, bits=3, group_size=32"


@pytest.mark.parametrize("kwargs,argument", [
    (dict(bits=5), "bits"),
    (dict(bits=True), "bits"),
    (dict(group_size=48), "group_size"),
    (dict(group_size=0), "group_size"),
])
def test_from_linear_bad_args_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        QuantLinear.from_linear(nn.Linear(64, 8), **kwargs)


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="linear"):
        QuantLinear.from_linear(nn.Conv2d(3, 3, 1))


# ---------------------------------------------------------------- QuantConfig


def test_quantconfig_validation_and_round_trip():
    config = QuantConfig(bits=3, group_size=-1, clip_search=True)
    assert QuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(bits=5)
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig(group_size=-2)
    with pytest.raises(ValueError, match="unknown"):
        QuantConfig.from_dict({"bits": 4, "groups": 8})
    with pytest.raises(AttributeError):
        config.bits = 4  # frozen


@pytest.mark.parametrize("group,k,expected", [
    (64, 576, 64), (128, 576, 96), (-1, 576, 576), (128, 64, 64), (48, 64, 32), (48, 100, 100), (32, 1536, 32),
])
def test_group_size_fallback(group, k, expected):
    assert QuantConfig(4, group).group_size_for(k) == expected


# ---------------------------------------------------------------- replace_linear


@pytest.mark.parametrize("family", FAMILIES)
def test_replace_linear_each_family(family):
    model = tiny_model(family, seed=3)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    ref = logits(model, ids)
    expected = linear_names(model) - {"lm_head"}
    head = model.lm_head.weight
    replace_linear(model, bits=8, group_size=32, progress=False)
    assert quant_names(model) == expected and len(expected) >= 4 * 4
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is head
    out8 = logits(model, ids)
    assert rel_err(out8, ref) < 0.03
    # 4 bits moves the logits much further: the 8-bit check above has teeth.
    model4 = replace_linear(tiny_model(family, seed=3), bits=4, group_size=32, progress=False)
    assert rel_err(logits(model4, ids), ref) > 3 * rel_err(out8, ref)


def test_replace_linear_overrides_and_filter():
    model = tiny_model("llama", seed=4)
    overrides = {"*.mlp.*": None, "model.layers.0.self_attn.q_proj": QuantConfig(2, 32), "lm_head": QuantConfig(8, 64)}
    replace_linear(model, bits=4, group_size=64, overrides=overrides, progress=False)
    assert isinstance(model.model.layers[1].mlp.up_proj, nn.Linear)
    assert model.model.layers[0].self_attn.q_proj.bits == 2
    assert model.model.layers[0].self_attn.q_proj.group_size == 32
    assert model.model.layers[1].self_attn.q_proj.bits == 4
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 8

    model = tiny_model("llama", seed=4)
    replace_linear(model, bits=4, filter=lambda name, module: name.endswith("v_proj"), progress=False)
    assert quant_names(model) == {f"model.layers.{i}.self_attn.v_proj" for i in range(4)}


def test_replace_linear_group_fallback_recorded():
    model = replace_linear(tiny_model("qwen2", seed=5), bits=4, group_size=48, progress=False)
    assert {m.group_size for m in model.modules() if isinstance(m, QuantLinear)} == {32}


def test_replace_linear_bad_args():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="bits"):
        replace_linear(model, bits=5, progress=False)
    with pytest.raises(TypeError, match="overrides"):
        replace_linear(model, overrides={"*": 4}, progress=False)
    with pytest.raises(TypeError, match="model"):
        replace_linear(nn.Linear(4, 4), progress=False)
    assert not quant_names(model)


# ---------------------------------------------------------------- checkpoints


def test_state_dict_carries_format_metadata():
    layer = QuantLinear.from_linear(nn.Linear(64, 8), bits=4, group_size=32)
    state = layer.state_dict()
    assert set(state) == {"qweight", "scale", "zero", "bias", "format_version", "bits", "group_size", "in_features"}
    assert [int(state[k]) for k in ("format_version", "bits", "group_size", "in_features")] == [1, 4, 32, 64]


def test_torch_save_round_trip_of_a_model(tmp_path):
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(6))
    model = replace_linear(tiny_model("llama", seed=6), bits=3, group_size=32, progress=False,
                           overrides={"*.o_proj": QuantConfig(8, 64)})
    torch.save(model.state_dict(), tmp_path / "model.pt")
    # A fresh model quantised with other settings adopts the checkpoint's layout on load.
    fresh = replace_linear(tiny_model("llama", seed=7), bits=4, group_size=64, progress=False)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert fresh.model.layers[0].self_attn.q_proj.bits == 3
    assert fresh.model.layers[0].self_attn.o_proj.group_size == 64
    assert torch.equal(logits(fresh, ids), logits(model, ids))


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, load_model, save_file, save_model

    torch.manual_seed(8)
    layer = QuantLinear.from_linear(nn.Linear(96, 12), bits=2, group_size=32)
    save_file(layer.state_dict(), tmp_path / "layer.safetensors")
    empty = QuantLinear(96, 12, bias=True, bits=2, group_size=32)
    empty.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    x = torch.randn(4, 96)
    assert torch.equal(empty(x), layer(x))

    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(8))
    model = replace_linear(tiny_model("gpt2", seed=8), bits=4, group_size=32, progress=False)
    save_model(model, str(tmp_path / "model.safetensors"))  # handles the tied head
    fresh = replace_linear(tiny_model("gpt2", seed=9), bits=4, group_size=32, progress=False)
    load_model(fresh, str(tmp_path / "model.safetensors"))
    assert torch.equal(logits(fresh, ids), logits(model, ids))


def test_wrong_format_version_is_a_clear_error():
    layer = QuantLinear.from_linear(nn.Linear(64, 8), bits=4, group_size=32)
    state = layer.state_dict()
    state["format_version"] = torch.tensor(2)
    target = QuantLinear(64, 8, bits=4, group_size=32)
    before = target.qweight.clone()
    with pytest.raises(ValueError, match="format_version is 2"):
        target.load_state_dict(state)
    assert torch.equal(target.qweight, before)


def test_missing_metadata_is_reported():
    state = QuantLinear.from_linear(nn.Linear(64, 8), bits=4, group_size=32).state_dict()
    del state["bits"]
    with pytest.raises(RuntimeError, match="Missing key.*bits"):
        QuantLinear(64, 8, bits=4, group_size=32).load_state_dict(state)


# ---------------------------------------------------------------- QuantEmbedding


def test_quant_embedding_lookup_matches_dequantised_table():
    torch.manual_seed(10)
    table = nn.Embedding(50, 64)
    emb = QuantEmbedding.from_embedding(table, bits=4, group_size=32)
    ids = torch.tensor([[0, 49, 7], [7, 3, 3]])
    out = emb(ids)
    assert out.shape == (2, 3, 64)
    assert torch.equal(out, emb.dequantize(torch.float32)[ids])
    assert rel_err(out, table(ids)) < 0.15
    assert emb(torch.zeros(0, dtype=torch.long)).shape == (0, 64)
