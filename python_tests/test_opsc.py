"""OPSC: decoder layer discovery, per-side quantisation and weight byte accounting."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from splitkernels.models import FAMILIES, tiny_model
from splitkernels.nn import QuantConfig, QuantEmbedding, QuantLinear
from splitkernels.opsc import OPSCReport, apply_opsc, decoder_layers, split_weight_bytes, weight_bytes


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@pytest.mark.parametrize("family,path", [
    ("llama", "model.layers"), ("mistral", "model.layers"), ("qwen2", "model.layers"),
    ("gpt2", "transformer.h"), ("opt", "model.decoder.layers"),
])
def test_decoder_layers_per_family(family, path):
    model = tiny_model(family, num_layers=3)
    layers = decoder_layers(model)
    assert layers is model.get_submodule(path) and len(layers) == 3


def test_decoder_layers_rejects_other_models():
    with pytest.raises(ValueError, match="model must be"):
        decoder_layers(nn.Sequential(nn.Linear(4, 4)))


def test_weight_bytes_counts_shared_tensors_once():
    a = nn.Linear(8, 4)
    b = nn.Linear(8, 4)
    b.weight = a.weight
    assert weight_bytes(nn.ModuleList([a, b])) == nbytes(a.weight) + nbytes(a.bias) + nbytes(b.bias)


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_beyond_split_untouched_with_dense_back(family):
    model = tiny_model(family, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = apply_opsc(model, 2, QuantConfig(4, 32), None)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        quant = [m for m in layer.modules() if isinstance(m, QuantLinear)]
        if i < 2:
            assert quant and all(m.bits == 4 and m.group_size == 32 for m in quant)
        else:
            assert not quant
    prefix = next(n for n, m in model.named_modules() if m is layers) + "."
    after = model.state_dict()
    untouched = [k for k in before if not k.startswith((prefix + "0.", prefix + "1."))]
    assert untouched and all(torch.equal(after[k], before[k]) for k in untouched)
    assert isinstance(model.get_output_embeddings(), nn.Linear)
    assert report.back_weight_bytes == split_weight_bytes(tiny_model(family, seed=1), 2)[1]


def test_back_config_and_split_edges():
    model = tiny_model("llama", seed=2, num_layers=3)
    apply_opsc(model, 1, QuantConfig(3, 32), QuantConfig(8, 64))
    bits = [{m.bits for m in layer.modules() if isinstance(m, QuantLinear)} for layer in decoder_layers(model)]
    assert bits == [{3}, {8}, {8}]

    model = tiny_model("llama", seed=2, num_layers=3)
    report = apply_opsc(model, 0, QuantConfig(4, 32), None)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    # Rotary frequencies are a non-persistent buffer, derived from the config: not stored weights.
    assert report.front_weight_bytes == weight_bytes(model.model.embed_tokens)

    model = tiny_model("llama", seed=2, num_layers=3)
    report = apply_opsc(model, 3, None, QuantConfig(4, 32))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert report.back_weight_bytes == weight_bytes(model.model.norm) + weight_bytes(model.lm_head)


def test_front_bytes_by_hand_and_shrinking_with_bits():
    hidden, inter, kv = 64, 128, 32  # tiny llama: 4 heads of 16, 2 kv heads
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
              (hidden, inter)]  # q, k, v, o, gate, up, down as (N, K)

    def packed(bits: int, group: int) -> int:
        return sum(n * ((k * bits + 31) // 32) * 4 + 2 * n * (k // group) * 4 for n, k in shapes)

    fronts = {}
    for bits in (8, 4, 3, 2):
        model = tiny_model("llama", seed=3)
        report = apply_opsc(model, 2, QuantConfig(bits, 32), None)
        norms = 2 * hidden * 4
        edge = weight_bytes(model.model.embed_tokens)  # rotary tables are not stored weights
        assert report.front_weight_bytes == edge + 2 * (packed(bits, 32) + norms)
        fronts[bits] = report.front_weight_bytes
    assert fronts[8] > fronts[4] > fronts[3] > fronts[2]
    dense_front = split_weight_bytes(tiny_model("llama", seed=3), 2)[0]
    assert dense_front > fronts[8]


def test_quantize_embedding_keeps_tied_head_dense():
    model = tiny_model("gpt2", seed=4)
    head = model.lm_head.weight.clone()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits
    plain = apply_opsc(tiny_model("gpt2", seed=4), 2, QuantConfig(8, 32), None)
    report = apply_opsc(model, 2, QuantConfig(8, 32), None, quantize_embedding=True)
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
    assert torch.equal(model.lm_head.weight, head)
    assert report.front_weight_bytes < plain.front_weight_bytes
    assert report.back_weight_bytes == plain.back_weight_bytes  # the head's copy stays on the back
    with torch.no_grad():
        out = model(ids).logits
    assert float((out - ref).norm() / ref.norm()) < 0.03


def test_report_str_and_bad_args():
    model = tiny_model("opt", seed=5)
    report = apply_opsc(model, 1, QuantConfig(4, 32), QuantConfig(8, 32))
    assert isinstance(report, OPSCReport)
    text = str(report)
    assert "split after layer 1 of 4" in text and "4-bit g32" in text and "8-bit g32" in text and "MiB" in text
    with pytest.raises(ValueError, match="split_layer"):
        apply_opsc(tiny_model("opt"), 5, QuantConfig(), None)
    with pytest.raises(ValueError, match="split_layer"):
        apply_opsc(tiny_model("opt"), -1, QuantConfig(), None)
    with pytest.raises(TypeError, match="front"):
        apply_opsc(tiny_model("opt"), 1, 4, None)
    with pytest.raises(ValueError, match="quantize_embedding"):
        apply_opsc(tiny_model("opt"), 1, None, None, quantize_embedding=True)


# ---------------------------------------------------------------- calibrated front (method="gptq")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@torch.no_grad()
def test_calibrated_front_beats_rtn_front_and_leaves_back_dense(family):
    torch.manual_seed(2)
    calibration = torch.randint(0, 256, (16, 64))
    held_out = torch.randint(0, 256, (4, 64))
    ref = tiny_model(family)(held_out).logits
    errors = {}
    for method in ("rtn", "gptq"):
        model = tiny_model(family)
        report = apply_opsc(model, 3, QuantConfig(4, 16, method=method), None, calibration=calibration,
                            progress=False)
        layers = decoder_layers(model)
        assert all(any(isinstance(m, QuantLinear) for m in layer.modules()) for layer in layers[:3])
        assert not any(isinstance(m, QuantLinear) for m in layers[3].modules())
        assert report.front.method == method
        errors[method] = float((model(held_out).logits - ref).norm())
    assert errors["gptq"] < 0.9 * errors["rtn"], errors


def test_calibrated_front_is_a_prefix_of_a_longer_front():
    """Each layer is fitted on what the layers before it produce, so a split's front does not
    depend on where the split is (bench/quality.py relies on this)."""
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    config = QuantConfig(3, 16, method="gptq")
    short, long = tiny_model("llama"), tiny_model("llama")
    apply_opsc(short, 2, config, None, calibration=calibration, progress=False)
    apply_opsc(long, 4, config, None, calibration=calibration, progress=False)
    for a, b in zip(decoder_layers(short)[:2].modules(), decoder_layers(long)[:2].modules()):
        if isinstance(a, QuantLinear):
            assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scale, b.scale)


def test_calibrated_front_with_quantised_embedding_and_rtn_back():
    model = tiny_model("llama")
    calibration = torch.randint(0, 256, (2, 32))
    report = apply_opsc(model, 2, QuantConfig(4, 16, method="gptq"), QuantConfig(8, 16), quantize_embedding=True,
                        calibration=calibration, progress=False)
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
    assert all(isinstance(m, QuantLinear) for layer in decoder_layers(model)
               for m in layer.modules() if isinstance(m, (nn.Linear, QuantLinear)))
    assert report.back == QuantConfig(8, 16)


def test_calibrated_front_needs_calibration_ids():
    with pytest.raises(ValueError, match="calibration token ids are required"):
        apply_opsc(tiny_model("llama"), 2, QuantConfig(4, 16, method="gptq"), None)
    with pytest.raises(TypeError, match="calibration must be"):
        apply_opsc(tiny_model("llama"), 2, QuantConfig(4, 16, method="gptq"), None, calibration=torch.zeros(8))
