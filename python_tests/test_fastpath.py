"""The native decode step (csrc/cpu/decode/, splitkernels.fastpath) against the model's own eager
forward: hidden states and logits within ||out - ref|| / ||ref|| < 1e-5 (fp32 weights and low-bit
ones alike: both paths dequantise the same codes), exact argmax and top k of the W8A8 head against
the fp32 head, the fast/eager cache hand-over, declined layouts, and greedy split generation identical
to the eager split."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import splitkernels._C as _C
from runtime_helpers import family_model, prompt as _prompt
from splitkernels.fastpath import (FastPathUnsupported, LogitMap, NativeDecoder, NativeHead, describe,
                                  quantize_rows_int8)
from splitkernels.fastpath import spec
from splitkernels.models import smollm2_available, tiny_model
from splitkernels.models.loading import TINY_SOFTCAP
from splitkernels.nn import QuantConfig, replace_linear
from splitkernels.runtime import SplitConfig, split_model

TOL = 1e-5  # ||out - ref|| / ||ref||: fp32 sums in another order


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def _llama(seed: int = 0, hidden: int = 64, layers: int = 3, **extra) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=3 * hidden, max_position_embeddings=512, **extra)
    return LlamaForCausalLM(config).eval()


def _compare_steps(model, first: int, last: int, head: str | None, steps: int = 5, prompt: int = 6,
                   min_capacity: int = 64) -> list[tuple[float, int, int]]:
    """Prefill eagerly, then run ``steps`` tokens natively and eagerly; per step (relative error
    of the hidden state or logits, native argmax, eager argmax)."""
    decoder = NativeDecoder(model, first, last, head=head)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt))
    ref_cache = DynamicCache(config=model.config)
    fast = decoder.new_cache(lambda: DynamicCache(config=model.config), min_capacity)
    out = []
    with torch.inference_mode():
        model(input_ids=ids, cache=ref_cache, use_cache=True)
        model(input_ids=ids, cache=fast.dynamic(), use_cache=True)
        for _ in range(steps):
            tok = torch.randint(0, vocab, (1, 1))
            ref = model(input_ids=tok, cache=ref_cache, use_cache=True, output_hidden_states=True)
            emb = decoder.embed(tok, fast.length)[0, 0]
            if head is None:
                hidden, token = decoder.step(emb, fast)
                out.append((_rel(hidden, ref.hidden_states[last][0, -1]), token, -1))
            else:
                logits = torch.empty(vocab)
                _, token = decoder.step(emb, fast, logits)
                ref_logits = ref.logits[0, -1]
                out.append((_rel(logits, ref_logits), token, int(ref_logits.argmax())))
    return out


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"])
@pytest.mark.parametrize("bits", [None, 4, 3])
def test_native_layers_match_eager(family, bits):
    model = tiny_model(family, seed=1, num_layers=3, hidden=64, vocab=128)
    if bits:
        replace_linear(model, bits=bits, group_size=32 if bits != 3 else 64)
    for err, token, ref_token in _compare_steps(model, 0, 3, head="fp32"):
        assert err < TOL and token == ref_token
    # A range ending at a split returns the split layer's output.
    for err, _, _ in _compare_steps(model, 0, 2, head=None):
        assert err < TOL


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
def test_native_layers_with_16_bit_scales_match_eager(scale_dtype):
    # fp32 activations against 16-bit scales, zeros and (Qwen2's Q/K/V) biases.
    model = tiny_model("qwen2", seed=3, num_layers=3, hidden=64, vocab=128)
    replace_linear(model, bits=4, group_size=32, scale_dtype=scale_dtype)
    assert model.model.layers[0].self_attn.q_proj.bias.dtype == getattr(torch, scale_dtype)
    for err, token, ref_token in _compare_steps(model, 0, 3, head="fp32"):
        assert err < TOL and token == ref_token


def test_odd_widths_biases_and_generic_isa():
    # head_dim 12 and intermediate 144: no vector divides them, so every tail path runs; Q/K/V biases.
    model = _llama(seed=2, hidden=48, attention_bias=True)
    replace_linear(model, bits=4, group_size=16)
    before = _C.lowbit_isa()
    try:
        for isa in _C.lowbit_isas():
            _C.set_lowbit_isa(isa)
            assert _C.decode_isa() in isa or (isa == "generic" and _C.decode_isa() == "generic")
            for err, token, ref_token in _compare_steps(model, 0, 3, head="fp32"):
                assert err < TOL and token == ref_token
    finally:
        _C.set_lowbit_isa(before)


@pytest.mark.parametrize("head_dim", [48, 80, 96, 136])
def test_attention_head_widths(head_dim):
    # The attention kernel sums up to eight output vectors per pass over the positions, then
    # the rest: at 8 lanes (AVX2) 48 is six vectors, 80 eight and two, 96 eight and four, 136
    # two passes and one; at 4 or 16 lanes other splits and float tails. 11 positions leave
    # a tail after the scores' steps of four.
    model = _llama(seed=6, hidden=64, layers=2, head_dim=head_dim)
    before = _C.lowbit_isa()
    try:
        for isa in _C.lowbit_isas():
            _C.set_lowbit_isa(isa)
            for err, token, ref_token in _compare_steps(model, 0, 2, head="fp32", steps=5, prompt=6):
                assert err < TOL and token == ref_token
    finally:
        _C.set_lowbit_isa(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_long_context_grows_the_cache_and_threads_agree(threads):
    # 70 positions from a capacity of 4: the buffer doubles five times (the threaded attention:
    # test_fastpath_step_batch.py).
    model = tiny_model("llama", seed=4, num_layers=2, hidden=64, vocab=128)
    before = _C.num_threads()
    _C.set_num_threads(threads)
    try:
        for err, token, ref_token in _compare_steps(model, 0, 2, head="fp32", steps=70, prompt=3, min_capacity=4):
            assert err < TOL and token == ref_token
    finally:
        _C.set_num_threads(before)


def test_int8_head_logits_and_exact_argmax():
    model = tiny_model("llama", seed=5, num_layers=2, hidden=64, vocab=128)
    _near_tied_head(model)
    for err, token, ref_token in _compare_steps(model, 0, 2, head="int8", steps=30):
        assert err < TOL  # asked for the logits, the int8 head computes them from the fp32 weight
        assert token == ref_token


def _near_tied_head(model) -> None:
    """Pairs of LM-head rows closer than an int8 step (about 5e-4 here) yet far above fp32
    rounding, so the W8A8 logits cannot order them and the exact fix-up must."""
    with torch.no_grad():
        w = model.lm_head.weight
        w[1::2] = w[0::2] + 1e-4 * torch.randn_like(w[0::2])


@pytest.mark.parametrize("family, head, bits", [("llama", "int8", None), ("mistral", "int8", None),
                                                 ("qwen2", "int8", None), ("llama", "fp32", None),
                                                 ("llama", "fp32", 4)])
def test_native_top_k_is_the_heads_exact_top_k(family, head, bits):
    model = tiny_model(family, seed=6, num_layers=2, hidden=64, vocab=128)
    _near_tied_head(model)
    if bits:  # a low-bit (OPSC) head runs as stored: its top k is the dequantised head's
        replace_linear(model, bits=bits, group_size=32)
    decoder = NativeDecoder(model, 2, 2, head=head)
    cache = decoder.new_cache(lambda: DynamicCache(config=model.config))
    before = _C.lowbit_isa()
    try:
        for step, isa in enumerate(_C.lowbit_isas() * 3):  # every int8 kernel, three hidden states each
            _C.set_lowbit_isa(isa)
            hidden = torch.randn(64) * (1 + step)
            with torch.no_grad():
                ref = model.lm_head(model.model.norm(hidden))
            for k in (1, 7, 40, 128):
                cache.truncate(0)
                _, ids, values = decoder.step_top(hidden, cache, k)
                ref_values, ref_ids = torch.topk(ref, k)
                assert torch.equal(ids, ref_ids), (isa, k)
                torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-5)
            cache.truncate(0)
            assert decoder.step(hidden, cache)[1] == int(ref.argmax())
    finally:
        _C.set_lowbit_isa(before)


def test_native_top_k_rejects_bad_k():
    model = tiny_model("llama", seed=1, num_layers=2, hidden=64, vocab=128)
    decoder = NativeDecoder(model, 0, 2, head="int8")
    cache = decoder.new_cache(lambda: DynamicCache(config=model.config))
    for k in (0, 129, True, 2.0):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, 128\]"):
            decoder.step_top(torch.zeros(64), cache, k)
    with pytest.raises(ValueError, match="step_top needs a decoder with a head"):
        NativeDecoder(model, 0, 2).step_top(torch.zeros(64), cache, 1)
    assert cache.length == 0  # refused before the step ran


def test_quantize_rows_int8():
    w = torch.randn(37, 50) * torch.rand(37, 1)
    w[3] = 0
    codes, scale = quantize_rows_int8(w)
    assert codes.dtype == torch.int8 and scale.shape == (37,) and scale[3] == 1
    assert int(codes.abs().max()) == 127
    assert ((codes.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


def _sliding(family: str) -> torch.nn.Module:
    """A tiny model of ``family`` with sliding-window layers: Gemma's alternate (windows of 8),
    Mistral's all slide (window 6), Qwen's slide from layer 1 on (window 5)."""
    if family in ("gemma2", "gemma3"):
        return tiny_model(family, seed=3, num_layers=4, hidden=64, vocab=128)
    model = tiny_model(family, seed=3, num_layers=4, hidden=64, vocab=128)
    config = model.config
    if family == "mistral":
        config.sliding_window = 6
    else:
        config.use_sliding_window, config.max_window_layers, config.sliding_window = True, 1, 5
        config.layer_types = ["full_attention"] + ["sliding_attention"] * 3
    torch.manual_seed(3)
    return type(model)(config).eval()


@pytest.mark.parametrize("family, windows", [("gemma3", [8, 0, 8, 0]), ("gemma2", [8, 0, 8, 0]),
                                             ("mistral", [6] * 4), ("qwen2", [0, 5, 5, 5]), ("qwen3", [0, 5, 5, 5])])
@pytest.mark.parametrize("prompt", [3, 12])
def test_sliding_layers_past_their_window(family, windows, prompt):
    # A prompt shorter than the window and one longer (the eager cache of a sliding layer then
    # holds its last window - 1 positions, handed over to the buffer's end), 20 native steps past
    # it, every instruction set; the argmax of the fp32 and the int8 head.
    model = _sliding(family)
    d = describe(model)
    assert [m.window for m in d.layers] == windows
    before = _C.lowbit_isa()
    try:
        for isa in _C.lowbit_isas():
            _C.set_lowbit_isa(isa)
            for head in ("fp32", "int8"):
                for err, token, ref_token in _compare_steps(model, 0, 4, head=head, steps=20, prompt=prompt,
                                                            min_capacity=4):
                    assert err < TOL and token == ref_token, (isa, head)
    finally:
        _C.set_lowbit_isa(before)


# Families whose layers are llama's, Gemma 1's (norms of 1 + w), Arcee's (an MLP of relu^2 without
# a gate), SmolLM3's (every fourth layer without rotary), OLMo's (LayerNorms without weights,
# queries, keys and values clamped), StableLM's (LayerNorms with biases, rotary over a quarter
# of each head), StarCoder 2's (LayerNorms, an MLP of gelu without a gate, every layer sliding;
# Jais 2's of relu^2), Phi's (LayerNorms; attention and MLP in parallel on one normed input; half
# of each head rotated; a biased head), Cohere's (LayerNorms without biases, parallel, interleaved rotary
# from a table repeating each angle, a logit scale; Cohere 2's full-attention layers without
# rotary), EXAONE 4's (norms after the sublayers only, per-head query and key norms,
# full-attention layers without rotary), OLMo 2's (norms after the sublayers, query and key
# norms over whole projections; OLMo 3's also a rotary table per layer type), Helium's and
# ERNIE 4.5's (rotary over interleaved pairs), GLM's (interleaved rotary over half of each head,
# a fused gate-up projection; GLM 4's also norms of the sublayers' outputs), Granite's
# (attention, residual, embedding and logit multipliers; HyperCLOVA X's multiply the logits and
# norm the sublayers' outputs too), Ministral 3's (queries scaled by position), Phi-3's (fused
# qkv and gate-up projections, every layer sliding), VaultGemma's (Gemma 2 without the norms
# after the sublayers), GPT-NeoX's (one qkv projection grouped by head, parallel layers whose MLP
# norms the layer's input itself, a quarter of each head rotated), Persimmon's (the same
# projection, LayerNorms of each query and key head, relu^2), GPT-2's and GPTBigCode's (learned
# position embeddings and no rotary, Conv1D projections of transposed weights, GPTBigCode's one
# key/value head), OPT's, BioGPT's and XGLM's (positions from row 2, XGLM's sinusoids, the MLP's
# projections on the layer itself, OPT's relu), Bloom's and MPT's (ALiBi, no rotary; Bloom's norm
# of the embeddings), Falcon's (one key/value head, parallel) or GPT-J's and CodeGen's (parallel,
# part of each head rotated by interleaved pairs from a module that returns sin before cos,
# CodeGen's qkv in shards), built from transformers' own configs; sliding layers included.
@pytest.mark.parametrize("family", ["exaone", "internlm3", "iquestcoder", "cwm", "seed_oss", "gemma", "arcee",
                                    "smollm3", "olmo", "stablelm", "starcoder2", "jais2", "phi", "cohere", "cohere2",
                                    "exaone4", "olmo2", "olmo3", "helium", "ernie4_5", "glm", "glm4", "granite",
                                    "hyperclovax", "ministral3", "phi3", "vaultgemma", "gpt_neox", "persimmon", "gpt2",
                                    "gpt_bigcode", "opt", "biogpt", "xglm", "bloom", "mpt", "falcon", "gptj",
                                    "codegen"])
def test_other_families_match_eager(family):
    model = family_model(family)
    d = describe(model)
    rotated = {"glm": 2, "glm4": 2, "phi": 2, "stablelm": 4, "gpt_neox": 4, "persimmon": 2}.get(family, 1)
    assert d.rotary_dim == (model.config.rotary_dim if family in ("gptj", "codegen") else d.head_dim // rotated)
    gpt = family in ("gpt2", "gpt_bigcode", "opt", "biogpt", "xglm")
    alibi = family in ("bloom", "mpt")
    gptj = family in ("gptj", "codegen")
    plain = gpt or alibi or gptj or family in ("arcee", "starcoder2", "jais2", "phi", "gpt_neox", "persimmon",
                                               "falcon")
    assert d.layer_norm == (gpt or alibi or gptj or family in ("olmo", "stablelm", "starcoder2", "jais2", "phi",
                                                               "cohere", "cohere2", "gpt_neox", "persimmon", "falcon"))
    assert d.parallel == (gptj or family in ("phi", "cohere", "cohere2", "gpt_neox", "falcon"))
    assert d.gated == (not plain)
    grouped = ("gpt_neox", "persimmon", "gpt_bigcode", "bloom", "falcon", "codegen")
    assert all((m.qkv is not None) == (family in grouped) for m in d.layers)
    assert (d.positions is not None) == gpt and (d.rope_types == ("no rotary",)) == (gpt or alibi)
    assert (d.alibi is not None) == alibi and (d.embed_norm is not None) == (family == "bloom")
    if family in ("gpt_bigcode", "falcon"):  # multi_query
        assert d.kv_heads == 1
    assert d.position_offset == (2 if family in ("opt", "biogpt", "xglm") else 0)
    if family == "gpt_neox":  # parallel, its MLP's norm its own
        assert all(m.post_norm is not None for m in d.layers)
    if family == "persimmon":
        assert all(m.q_norm.bias is not None and not m.q_norm.each for m in d.layers)
    if family == "starcoder2":
        assert [m.window for m in d.layers] == [5] * 4
    if family in ("olmo3", "vaultgemma"):
        assert [m.window for m in d.layers] == [5, 0, 5, 0]
    if family == "vaultgemma":
        assert d.attn_softcap == d.logit_softcap == TINY_SOFTCAP and d.layers[0].attn_out_norm is None
    if family == "smollm3":
        assert d.rope_types == (None, "no rotary") and [m.rope for m in d.layers] == [0, 0, 0, 1]
    if family in ("cwm", "exaone4", "phi3"):
        assert 5 in [m.window for m in d.layers]
    if family == "exaone4":
        assert [d.rope_types[m.rope] is None for m in d.layers] == [m.window > 0 for m in d.layers]
    if family in ("exaone4", "olmo2"):
        assert all(m.input_norm is None and m.post_norm is None and m.attn_out_norm is not None for m in d.layers)
    for head in ("fp32", "int8"):
        for err, token, ref_token in _compare_steps(model, 0, 4, head=head, steps=10, prompt=8):
            assert err < TOL and token == ref_token, head


@pytest.mark.parametrize("family", ["phi3", "gpt_neox", "gpt2", "gpt_bigcode", "falcon", "mpt"])
@pytest.mark.parametrize("bits", [4, 3])
def test_fused_projections_of_low_bit_weights(family, bits):
    # Phi-3's, GPT-2's and MPT's q, k and v (and Phi-3's gate and up) are row ranges of one packed
    # weight: their codes, scales and zeros are views into it at a row offset (GPT-2's quantised
    # from Conv1D's transposed weights); GPT-NeoX's, GPTBigCode's and Falcon's one grouped
    # projection (Falcon's FalconLinear replaced as an nn.Linear).
    model = family_model(family)
    replace_linear(model, bits=bits, group_size=32 if bits != 3 else 64, progress=False)
    assert not any(type(m).__name__ == "FalconLinear" for m in model.modules())
    for head in ("fp32", "int8"):
        for err, token, ref_token in _compare_steps(model, 0, 4, head=head, steps=8, prompt=8):
            assert err < TOL and token == ref_token, head


@pytest.mark.parametrize("family, renormalize, shared", [("mixtral", True, False), ("qwen2_moe", False, True),
                                                          ("qwen3_moe", True, False), ("olmoe", False, False),
                                                          ("flex_olmo", False, False), ("flint", True, True),
                                                          ("granitemoe", True, False), ("glm4_moe", True, True),
                                                          ("sarvam_moe", True, True), ("exaone_moe", True, True),
                                                          ("minimax_m2", True, False), ("hy_v3", True, True),
                                                          ("granitemoeshared", True, True), ("gpt_oss", True, False),
                                                          ("solar_open", True, True), ("mellum", True, False),
                                                          ("aria_text", True, True), ("kolibri1", False, True)])
@pytest.mark.parametrize("bits", [None, 4])
def test_mixtures_of_experts_match_eager(family, renormalize, shared, bits):
    # A router's softmax picks the top 2 of 4 experts (renormalised or not), each a gated MLP of
    # one slice of the 3-D expert weights (fp32 also where the rest is low-bit: replace_linear
    # quantises linear layers); Qwen 2 MoE adds a shared expert under a sigmoid gate; FlexOlmo's
    # layers norm their sublayers' outputs only (OLMo 2's layer with OLMoE's experts); Flint scores
    # experts by sigmoids, adds its shared expert in full, gives each attention head a sink and
    # rotates in its sliding layers only; Granite MoE softmaxes its top k's logits (the same as the
    # renormalised top k) under Granite's multipliers (Granite MoE Shared adds its layer's
    # shared MLP, one fused gate-up projection, in full); GLM 4 MoE, Sarvam MoE and EXAONE MoE choose
    # as DeepSeek-V3 does (sigmoids plus a correction bias, among the best of two groups, scaled),
    # their first layer dense; MiniMax M2 and HY 3 so without groups, the bias on the block;
    # gpt-oss's experts are input-major with gate and up columns alternating, biased (its router
    # too) under a clamped SwiGLU, its attention with sinks and rotary tables of one value per angle;
    # Solar Open chooses as DeepSeek-V3; Mellum's sliding layers rotate by a table of their own;
    # Aria's experts are input-major too, the gate's columns before the up's, beside shared experts;
    # Kolibri picks by logit plus the correction bias and weighs by sigmoids, under GLM 4's norms.
    mellum = dict(layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=5)
    model = family_model(family, **(mellum if family == "mellum" else {}))
    if bits:
        replace_linear(model, bits=bits, group_size=32, progress=False)
    d = describe(model)
    mixtures = [m for m in d.layers if m.experts is not None]  # some keep dense MLPs in their first layers
    assert len(mixtures) >= 2 and all(m.gate is None for m in mixtures)
    assert all(m.experts.top_k == 2 and m.experts.router.shape[0] == 4 and m.experts.renormalize == renormalize
               and (m.experts.shared is not None) == shared for m in mixtures)
    assert all((m.sinks is not None) == (family in ("flint", "gpt_oss")) for m in d.layers)
    assert all(m.experts.input_major == (family in ("gpt_oss", "aria_text"))
               and m.experts.alternate == (m.experts.router_bias is not None) == (family == "gpt_oss")
               for m in mixtures)
    grouped = family in ("glm4_moe", "sarvam_moe", "exaone_moe", "solar_open")
    if family == "mellum":
        assert [m.window for m in d.layers] == [5, 0, 5, 0] and [m.rope for m in d.layers] == [1, 0, 1, 0]
    biased = grouped or family in ("minimax_m2", "hy_v3", "kolibri1")
    assert all(m.experts.choose_by_logit == (family == "kolibri1") for m in mixtures)
    assert all(m.experts.sigmoid == (family == "flint" or biased) for m in mixtures)
    choice = (2, 1, 2.5) if grouped else (1, 1, model.config.router_scaling_factor if family == "hy_v3" else 1.0)
    assert all((m.experts.groups, m.experts.top_groups, m.experts.routed_scale) == choice
               and (m.experts.choice_bias is not None) == biased for m in mixtures)
    for head in ("fp32", "int8"):
        for err, token, ref_token in _compare_steps(model, 0, 4, head=head, steps=8, prompt=8):
            assert err < TOL and token == ref_token, head


def test_dense_layers_of_a_mixture_of_experts_model_match_eager():
    model = family_model("qwen2_moe", mlp_only_layers=[1, 2])  # these layers keep one dense MLP
    assert [m.experts is None for m in describe(model).layers] == [False, True, True, False]
    for err, token, ref_token in _compare_steps(model, 0, 4, head="int8", steps=8, prompt=8):
        assert err < TOL and token == ref_token


def _double_down(model):
    model.model.layers[2].mlp.experts.down_proj.data = model.model.layers[2].mlp.experts.down_proj.data.double()


@pytest.mark.parametrize("family, spoil, reason", [
    ("mixtral", _double_down, "layer 2 experts are not fp32 gate_up_proj and down_proj"),
    ("mixtral", lambda m: setattr(m.model.layers[1].mlp.gate, "top_k", 5),
     r"layer 1 experts' shapes .* top 5\) are not one router"),
    ("flint", lambda m: setattr(m.model.layers[3].self_attn, "sinks", torch.nn.Parameter(torch.zeros(3))),
     r"layer 3 attention sinks are not fp32 \[4\]"),
    ("glm4_moe", lambda m: setattr(m.model.layers[2].mlp.gate, "topk_group", 3),
     r"layer 2 router's grouped choice \(bias, 2 groups, top 3"),
    ("mixtral", lambda m: m.model.layers[0].mlp.gate.register_buffer("e_score_correction_bias", torch.zeros(4)),
     "layer 0 router holds e_score_correction_bias, which the native"),
    ("qwen2_moe", lambda m: setattr(m.model.layers[0].mlp, "shared_expert_gate", torch.nn.Linear(64, 1, bias=True)),
     "layer 0 shared expert's gate has a bias"),
    ("granitemoeshared", lambda m: setattr(m.model.layers[1].shared_mlp, "output_linear", torch.nn.Linear(32, 64)),
     r"layer 1 shared_mlp input_linear is \[128, 64\], expected \[64, 64\]"),
    ("granitemoeshared", lambda m: setattr(m.model.layers[2].shared_mlp, "extra", torch.nn.Linear(64, 64)),
     "layer 2 shared_mlp is not a gated MLP of input_linear and output_linear"),
    ("gpt_oss", lambda m: setattr(m.model.layers[1].mlp.experts, "limit", float("inf")),
     r"layer 1 experts' biases or SwiGLU \(alpha 1.702, limit inf\)"),
    ("gpt_oss",
     lambda m: setattr(m.model.layers[2].mlp.experts, "down_proj_bias", torch.nn.Parameter(torch.zeros(4, 63))),
     r"layer 2 experts' biases or SwiGLU"),
    ("gpt_oss", lambda m: setattr(m.model.layers[0].mlp.router, "bias", None),
     "layer 0 experts are not fp32 .* behind a router of a weight and bias")])
def test_declines_experts_it_cannot_read(family, spoil, reason):
    model = family_model(family)
    spoil(model)
    with pytest.raises(FastPathUnsupported, match=reason):
        describe(model)


@pytest.mark.parametrize("act", ["relu2", "gelu", "gelu_new", "silu"])
def test_mlp_activations_match_eager(act):
    model = family_model("arcee", hidden_act=act)
    assert describe(model).act == {"silu": 0, "gelu_new": 1, "relu2": 2, "gelu": 3}[act]
    for err, token, ref_token in _compare_steps(model, 0, 4, head="fp32", steps=6, prompt=8):
        assert err < TOL and token == ref_token


def test_stablelm_parallel_residual_matches_eager():
    # use_parallel_residual: no post-attention norm; the MLP takes the attention's normed input.
    model = family_model("stablelm", use_parallel_residual=True)
    d = describe(model)
    assert d.parallel and all(m.post_norm is None for m in d.layers)
    for err, token, ref_token in _compare_steps(model, 0, 4, head="int8", steps=8, prompt=8):
        assert err < TOL and token == ref_token


# The config flags of other layouts: LayerNorms of each query and key head, one shared by every
# head (Phi), one per head (StableLM, a list of norms; Cohere, a weight row per head); GPT-NeoX's
# sequential layers; Persimmon without its head norms; GPTBigCode with a key/value head for each
# query head (its qkv projection then grouped by head); OPT's LayerNorms without weights.
@pytest.mark.parametrize("family, flags, each", [
    ("phi", {"qk_layernorm": True}, False), ("stablelm", {"qk_layernorm": True}, True),
    ("stablelm", {"qk_layernorm": True, "use_parallel_residual": True}, True), ("cohere", {"use_qk_norm": True}, True),
    ("gpt_neox", {"use_parallel_residual": False}, None), ("persimmon", {"qk_layernorm": False}, None),
    ("gpt_bigcode", {"multi_query": False}, None), ("opt", {"layer_norm_elementwise_affine": False}, None)])
def test_head_norm_and_layout_flags_match_eager(family, flags, each):
    model = family_model(family, **flags)
    d = describe(model)
    assert all((m.q_norm is None) == (each is None) for m in d.layers)
    if each is not None:
        assert d.layers[0].q_norm.each == each and d.layers[0].q_norm.weight.shape[0] == (4 if each else 16)
    for err, token, ref_token in _compare_steps(model, 0, 4, head="int8", steps=8, prompt=8):
        assert err < TOL and token == ref_token


def test_grouped_qkv_with_several_query_heads_a_group(monkeypatch):
    # No transformers family groups more than one query head with each key/value head in a
    # grouped projection, so llama's q, k and v (4 query heads over 2 key/value heads) are
    # rearranged into one, [q0 q1 k0 v0 q2 q3 k1 v1] by heads, and described as GPT-NeoX's.
    model = tiny_model("llama", seed=3, num_layers=2, hidden=64, vocab=128)
    reference = NativeDecoder(model, 0, 2)
    grouped = copy.deepcopy(model)
    for layer in grouped.model.layers:
        attn = layer.self_attn
        q, k, v = (w.weight.view(2, -1, 64) for w in (attn.q_proj, attn.k_proj, attn.v_proj))
        fused = torch.nn.Linear(64, 128, bias=False)
        fused.weight.data = torch.cat([q, k, v], dim=1).reshape(128, 64)
        del attn.q_proj, attn.k_proj, attn.v_proj
        attn.query_key_value = fused
    monkeypatch.setitem(spec._FAMILIES, "llama", spec._Family(grouped_qkv="query_key_value"))
    native = NativeDecoder(grouped, 0, 2)
    caches = [d.new_cache(lambda: DynamicCache(config=model.config), 16) for d in (reference, native)]
    for _ in range(5):
        emb = reference.embed(torch.randint(0, 128, (1, 1)), caches[0].length)[0, 0]
        a, b = (d.step(emb.clone(), c)[0] for d, c in zip((reference, native), caches))
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", [dict(new_decoder_architecture=True, num_kv_heads=2),
                                    dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1),
                                    dict(multi_query=False, num_kv_heads=4), dict(parallel_attn=False, bias=True)])
def test_falcon_layouts_match_eager_and_hand_over_their_cache(layout):
    # Falcon's newer layout (two key/value heads, their rows grouped with their query heads, with
    # two parallel norms or one), per-head q, k and v, and sequential layers with biases. The newer
    # layout's cache holds each key/value head once per query head: the native buffer holds it
    # once, and the hand-over to the eager cache (a 3-token eager step) and back keeps every logit.
    model = family_model("falcon", **layout)
    d = describe(model)
    newer = "new_decoder_architecture" in layout
    assert (d.kv_heads, d.cache_repeats) == ((2, 2) if newer else (4 if "multi_query" in layout else 1, 1))
    assert d.parallel == ("parallel_attn" not in layout)
    two_norms = (newer and "num_ln_in_parallel_attn" not in layout) or not d.parallel  # the MLP's own
    assert all((m.post_norm is not None) == two_norms for m in d.layers)
    for err, token, ref_token in _compare_steps(model, 0, 4, head="fp32", steps=8, prompt=8):
        assert err < TOL and token == ref_token
    decoder = NativeDecoder(model, 0, 4, head="fp32")
    ref_cache = DynamicCache(config=model.config)
    fast = decoder.new_cache(lambda: DynamicCache(config=model.config))
    seq = torch.randint(0, 128, (1, 12))
    pos = 0
    with torch.inference_mode():
        for n in [4, 1, 1, 3, 1, 1]:
            ids = seq[:, pos:pos + n]
            ref = model(input_ids=ids, cache=ref_cache, use_cache=True).logits[0, -1]
            if n == 1:
                logits = torch.empty(128)
                decoder.step(decoder.embed(ids, pos)[0, 0], fast, logits)
            else:
                logits = model(input_ids=ids, cache=fast.dynamic(), use_cache=True).logits[0, -1]
            pos += n
            assert _rel(logits, ref) < TOL
    assert fast.nbytes() == pos * 4 * 2 * d.kv_heads * d.cache_repeats * d.head_dim * 4


@pytest.mark.parametrize("bits", [None, 4])
def test_codegen_qkv_shards_of_several_heads(bits):
    # CodeGen's qkv is 4 shards, each the query, value and key rows of its share of the heads: 8
    # heads put two in each (the tiny config's 4 one), also as one packed low-bit weight.
    model = family_model("codegen", n_head=8, rotary_dim=4)
    if bits:
        replace_linear(model, bits=bits, group_size=32, progress=False)
    rows = describe(model).layers[0].qkv_rows
    assert rows[:16].tolist() == list(range(16)) and rows[16:32].tolist() == list(range(128, 144))
    assert sorted(rows.tolist()) == list(range(192))
    for err, token, ref_token in _compare_steps(model, 0, 4, head="fp32", steps=8, prompt=8):
        assert err < TOL and token == ref_token


def test_alibi_over_a_long_context_as_the_models():
    # Bloom's biases grow with the position from the first, MPT's back from the last: over 70
    # steps (the cache growing from 4 positions) both match the model's own.
    for family in ("bloom", "mpt"):
        model = family_model(family)
        for err, token, ref_token in _compare_steps(model, 0, 4, head="fp32", steps=70, prompt=3, min_capacity=4):
            assert err < TOL and token == ref_token, family


def test_declines_alibi_it_cannot_read(monkeypatch):
    bloom = family_model("bloom")
    monkeypatch.setattr(bloom.transformer, "build_alibi_tensor",
                        lambda mask, heads, dtype: (mask.cumsum(-1) ** 2).float().expand(heads, 1, -1))
    with pytest.raises(FastPathUnsupported, match="build_alibi_tensor's biases are not a slope per head"):
        describe(bloom)
    monkeypatch.setattr(bloom.transformer, "build_alibi_tensor", None)
    with pytest.raises(FastPathUnsupported, match="the decoder has no build_alibi_tensor"):
        describe(bloom)


def test_declines_head_norms_it_cannot_read():
    model = family_model("stablelm", qk_layernorm=True)
    norms = model.model.layers[1].self_attn.k_layernorm.norms
    norms[1] = torch.nn.LayerNorm(16, bias=True)  # the other heads' norms have no bias
    with pytest.raises(FastPathUnsupported, match="layer 1 k_layernorm has a bias in some heads' norms only"):
        describe(model)
    del norms[1]
    with pytest.raises(FastPathUnsupported, match="layer 1 k_layernorm is not one norm for each of its 2 heads"):
        describe(model)


def _longrope_phi(switch: int = 6):
    """A tiny Phi-3 with Phi-4-mini's rotary: longrope over three quarters of each head, its
    original context ``switch`` positions long."""
    rope = {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.75,
            "short_factor": [1.0 + 0.1 * i for i in range(6)], "long_factor": [2.0 + 0.5 * i for i in range(6)],
            "original_max_position_embeddings": switch}
    return family_model("phi3", original_max_position_embeddings=switch, rope_parameters=rope)


@pytest.mark.parametrize("prompt", [3, 8])
def test_longrope_switches_at_the_original_context(prompt):
    # A decode step at position p sees p + 1 positions: the short frequencies up to the original
    # context, the long ones past it (the prompt of 3 crosses the switch at 6 while decoding).
    model = _longrope_phi()
    d = describe(model)
    assert d.rope_switch == 6 and d.rotary_dim == 12 and d.rotary is not model.model.rotary_emb
    for head in ("fp32", "int8"):
        for err, token, ref_token in _compare_steps(model, 0, 4, head=head, steps=8, prompt=prompt, min_capacity=4):
            assert err < TOL and token == ref_token, head


def test_longrope_tables_leave_the_models_module_alone():
    # The module sets its frequencies on every call; the native tables come from a copy of it.
    model = _longrope_phi()
    rotary = model.model.rotary_emb
    before = rotary.inv_freq.clone()
    NativeDecoder(model, 0, 4)._rope_rows(32)
    assert torch.equal(rotary.inv_freq, before) and torch.equal(rotary.inv_freq, rotary.original_inv_freq)
    model.config.rope_parameters["original_max_position_embeddings"] = 0
    with pytest.raises(FastPathUnsupported, match="longrope's original_max_position_embeddings 0 is not a positive"):
        describe(model)


def test_hyperclovax_without_its_optional_norms_matches_eager():
    # use_post_norm off leaves an nn.Identity where the norms of the sublayers' outputs would be.
    model = family_model("hyperclovax", use_post_norm=False)
    d = describe(model)
    assert all(m.attn_out_norm is None and m.mlp_out_norm is None and m.input_norm is not None for m in d.layers)
    for err, token, ref_token in _compare_steps(model, 0, 4, head="int8", steps=8, prompt=8):
        assert err < TOL and token == ref_token


def test_partial_rotary_of_low_bit_weights_and_bad_widths():
    model = family_model("glm")
    replace_linear(model, bits=4, group_size=32, progress=False)
    for err, token, ref_token in _compare_steps(model, 0, 4, head="fp32", steps=8, prompt=8):
        assert err < TOL and token == ref_token
    for bad in (-2, 3, 18):  # head_dim 16
        with pytest.raises(ValueError, match="rotary_dim must be even and in"):
            _C.DecodeStack(64, 4, 2, 16, 128, 0.25, rotary_dim=bad)


def test_declines_weights_the_layer_modules_hold_themselves():
    # Granite SWA's attention keeps a sink per head as its own parameter, not in a child module.
    model = family_model("glm")
    model.model.layers[1].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(FastPathUnsupported, match="layer 1 has weights the native step lacks: attention.sinks"):
        describe(model)


def test_declines_a_layer_whose_rotary_choice_disagrees():
    model = family_model("smollm3")
    model.model.layers[3].self_attn.use_rope = 1  # the config says layer 3 has none
    with pytest.raises(FastPathUnsupported, match="layer 3 attention's use_rope is 1"):
        describe(model)
    model.config.no_rope_layers = [1, 1, 2, 1]
    with pytest.raises(FastPathUnsupported, match=r"no_rope_layers \[1, 1, 2, 1\] is not one 0 or 1 per layer"):
        describe(model)


def test_mistral_slides_every_layer_whatever_layer_types_say():
    # Mistral's forward reads config.sliding_window for every layer and never layer_types.
    model = _sliding("mistral")
    model.config.layer_types = ["full_attention", "sliding_attention"] * 2
    assert [m.window for m in describe(model).layers] == [6] * 4
    model.config.sliding_window = None
    assert [m.window for m in describe(model).layers] == [0] * 4


def test_gemma_layer_kinds_are_described():
    g3, g2 = tiny_model("gemma3", seed=3, num_layers=4), tiny_model("gemma2", seed=3, num_layers=4)
    assert [layer.self_attn.sliding_window for layer in g3.model.layers] == [8, None, 8, None]
    d = describe(g3)
    assert d.rope_types == ("full_attention", "sliding_attention") and d.act == 1 and d.norm_offset == 1.0
    assert [m.rope for m in d.layers] == [1, 0, 1, 0] and d.attn_softcap == d.logit_softcap == 0.0
    d = describe(g2)
    assert d.rope_types == (None,) and d.act == 1 and d.norm_offset == 1.0 and d.layers[0].q_norm is None
    assert d.attn_softcap == d.logit_softcap == TINY_SOFTCAP


def test_gemma2_soft_caps_count():
    # Without either cap the tiny Gemma 2's logits move far past the tolerance: the test of the
    # capped native step against the capped model can fail.
    model = tiny_model("gemma2", seed=2, num_layers=2, hidden=64, vocab=128)
    with torch.no_grad():  # scores well past the cap (the logits reach theirs as they are)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10)
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        capped = model(ids).logits[0]
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            uncapped = copy.deepcopy(model)
            setattr(uncapped.config, name, None)
            for layer in uncapped.model.layers:
                layer.self_attn.attn_logit_softcapping = uncapped.config.attn_logit_softcapping
            assert _rel(uncapped(ids).logits[0], capped) > 100 * TOL, name
    for head in ("fp32", "int8"):
        for err, token, ref_token in _compare_steps(model, 0, 2, head=head, steps=6):
            assert err < TOL and token == ref_token


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "qwen3", "granite"])
def test_split_greedy_and_sampling_equal_eager_split(family):
    model = family_model(family) if family == "granite" else tiny_model(family, seed=5, num_layers=4)
    ids = _prompt(8, 11) % model.config.vocab_size
    fast = split_model(copy.deepcopy(model), 2)
    eager = split_model(copy.deepcopy(model), 2, fast=False)
    assert fast.edge.fast and fast.server.fast
    assert torch.equal(fast.generate(ids, 16), eager.generate(ids, 16))
    a = fast.generate(ids, 12, do_sample=True, top_k=5, temperature=1.5, seed=11)
    assert torch.equal(a, eager.generate(ids, 12, do_sample=True, top_k=5, temperature=1.5, seed=11))


def test_cache_hands_over_between_eager_and_native():
    # prefill (eager) -> 3 native steps -> a 3-token eager step (rebuilds the eager cache from the
    # buffer) -> 3 native steps (refills the buffer): every hidden state as the eager model's.
    model = tiny_model("llama", seed=6, num_layers=2, hidden=64, vocab=128)
    decoder = NativeDecoder(model, 0, 2, head="fp32")
    ref_cache = DynamicCache(config=model.config)
    fast = decoder.new_cache(lambda: DynamicCache(config=model.config))
    seq = torch.randint(0, 128, (1, 14))
    plan = [5, 1, 1, 1, 3, 1, 1, 1]
    pos = 0
    with torch.inference_mode():
        for n in plan:
            ids = seq[:, pos:pos + n]
            ref = model(input_ids=ids, cache=ref_cache, use_cache=True).logits[0, -1]
            if n == 1:
                logits = torch.empty(128)
                decoder.step(model.get_input_embeddings()(ids)[0, 0], fast, logits)
            else:
                logits = model(input_ids=ids, cache=fast.dynamic(), use_cache=True).logits[0, -1]
            pos += n
            assert fast.length == pos
            assert _rel(logits, ref) < TOL
    assert fast.nbytes() == pos * 2 * 2 * 2 * 16 * 4  # layers, K and V, kv heads, head_dim, fp32


@pytest.mark.parametrize("build, reason", [
    (lambda: family_model("ctrl"), "family 'ctrl'"),
    (lambda: family_model("opt", do_layer_norm_before=False), "the native step needs do_layer_norm_before"),
    (lambda: family_model("opt", word_embed_proj_dim=32), "the native step has no project_in, project_out"),
    # Falcon's ALiBi biases are rounded to bfloat16 at each absolute position; Bloom's residual
    # from the normed input.
    (lambda: family_model("falcon", alibi=True), "the native step has no alibi"),
    (lambda: family_model("aria_text", hidden_act="gelu"), "the routed experts' activation is silu, the shared"),
    (lambda: family_model("bloom", apply_residual_connection_post_layernorm=True),
     "the native step has no apply_residual_connection_post_layernorm"),
    (lambda: family_model("falcon", new_decoder_architecture=True, num_kv_heads=3), "num_kv_heads 3 does not divide"),
    (lambda: _with_config(family_model("mpt"), attn_config={"softmax_scale": -1.0}),
     "attn_config.softmax_scale -1.0 is not a positive number"),
    (lambda: _llama(hidden_act="tanh"), "activation is 'tanh'"),
    (lambda: _llama().to(torch.bfloat16), "runs in torch.bfloat16"),
    (lambda: _llama().to("meta"), r"runs on the CPU; the model is on \['meta'\]"),
    (lambda: _llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
     "rotary type 'dynamic'"),
    (lambda: MistralForCausalLM(MistralConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                              sliding_window=-4)), "sliding_window -4 is not a positive"),
    (lambda: _gemma3(use_bidirectional_attention=True), "layer types .* are not covered"),
    (lambda: _gemma3(hidden_activation="relu6"), "activation is 'relu6'"),
    (lambda: _with_config(family_model("cohere"), logit_scale=0.0), "logit_scale 0.0 is not a positive number"),
    (lambda: _with_config(family_model("olmo"), clip_qkv=-1.0), "clip_qkv -1.0 is not a positive number"),
    (lambda: _norm_swapped("stablelm", "phi3"),
     "layer 1 input_layernorm is a Phi3RMSNorm, not a LayerNorm of width 64"),
    (lambda: _norm_swapped("phi3", "stablelm"), "layer 1 input_layernorm is a LayerNorm, not an RMSNorm of width 64"),
    (lambda: _with_config(_llama(), layer_types=["chunked_attention"] * 3), "layer types .* are not covered"),
    (lambda: _with_config(_llama(), layer_types=["full_attention"] * 2), "2 layer types for 3 layers"),
    (lambda: _with_config(_llama(), attn_logit_softcapping=50.0), "attn_logit_softcapping is not covered"),
    (lambda: _with_config(tiny_model("gemma2", num_layers=2), final_logit_softcapping=-1.0),
     "final_logit_softcapping -1.0 is not a positive number"),
    (lambda: _window_disagrees(), "layer 0 attention slides over 8 positions, the config 4"),
    (lambda: _with_config(family_model("granite"), residual_multiplier=0.0),
     "residual_multiplier 0.0 is not a positive"),
    (lambda: _with_config(family_model("ministral3"), rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                        "llama_4_scaling_beta": 0.1}),
     "llama_4_scaling_beta 0.1 over original_max_position_embeddings None"),
])
def test_declines_uncovered_layouts_with_a_reason(build, reason):
    with pytest.raises(FastPathUnsupported, match=reason):
        describe(build())


def _gemma3(**extra):
    """A tiny Gemma 3 with ``extra`` config fields changed."""
    model = tiny_model("gemma3", seed=1, num_layers=2, hidden=64, vocab=96)
    config = model.config
    for name, value in extra.items():
        setattr(config, name, value)
    return type(model)(config).eval()


def _with_config(model, **fields):
    for name, value in fields.items():
        setattr(model.config, name, value)
    return model


def _window_disagrees():
    model = tiny_model("gemma2", seed=1, num_layers=2)
    model.config.sliding_window = 4  # the layers were built with windows of 8
    return model


def test_declines_a_layer_with_extra_weights():
    model = _llama()
    model.model.layers[1].self_attn.q_norm = torch.nn.LayerNorm(16)
    describe(model, 0, 1)  # only layer 0 is asked for
    with pytest.raises(FastPathUnsupported, match="layer 1 attention has weights.*q_norm"):
        describe(model)


def _norm_swapped(family: str, other: str):
    """A model of ``family`` whose layer 1 input norm is ``other``'s kind of norm."""
    model, donor = family_model(family), family_model(other)
    model.model.layers[1].input_layernorm = donor.model.layers[1].input_layernorm
    return model


def test_decode_stack_rejects_bad_sizes():
    stack = _C.DecodeStack(64, 4, 2, 16, 128, 0.25)
    good = {"kind": 1, "N": 64, "K": 64, "weight": 1}
    with pytest.raises(ValueError, match=r"k_proj must be \[32, 64\], got \[64, 64\]"):
        stack.add_layer(1, 1, 1e-6, good, good, good, good, good, good, good)
    with pytest.raises(ValueError, match="window and rope must be >= 0"):
        stack.add_layer(1, 1, 1e-6, good, good, good, good, good, good, good, window=-1)
    for act in (-1, 5):
        with pytest.raises(ValueError, match=r"act must be 0 \(silu\), 1 .* or 4 \(relu\)"):
            _C.DecodeStack(64, 4, 2, 16, 128, 0.25, act)
    for clip in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="clip_qkv must be finite and >= 0"):
            _C.DecodeStack(64, 4, 2, 16, 128, 0.25, clip_qkv=clip)
    # A gate in an MLP without one, a bias on an RMSNorm or on the head's RMSNorm.
    plain = _C.DecodeStack(64, 4, 2, 16, 64, 0.25, gated=False)
    kv = {"kind": 1, "N": 32, "K": 64, "weight": 1}
    with pytest.raises(ValueError, match="gate_proj must be empty: the MLP is not gated"):
        plain.add_layer(1, 1, 1e-6, good, kv, kv, good, good, good, good)
    with pytest.raises(ValueError, match="an RMSNorm has no bias"):
        stack.add_layer(1, 1, 1e-6, good, kv, kv, good, {**good, "N": 128}, {**good, "N": 128},
                        {**good, "K": 128}, input_norm_bias=1)
    with pytest.raises(ValueError, match="only a LayerNorm has a bias"):
        stack.set_head(1, 1e-6, good, norm_bias=1)
    # A grouped qkv projection and the head norms' weights, biases and layouts.
    mlp = ({**good, "N": 128}, {**good, "N": 128}, {**good, "K": 128})
    fused = {"kind": 1, "N": 128, "K": 64, "weight": 1}
    order = torch.arange(128)
    with pytest.raises(ValueError, match="q_proj, k_proj and v_proj must be empty beside a fused qkv"):
        stack.add_layer(1, 1, 1e-6, good, kv, kv, good, *mlp, qkv=fused)
    with pytest.raises(ValueError, match=r"qkv must be \[128, 64\], got \[96, 64\]"):
        stack.add_layer(1, 1, 1e-6, {}, {}, {}, good, *mlp, qkv={**fused, "N": 96})
    with pytest.raises(ValueError, match="a fused qkv needs the order of its rows"):
        stack.add_layer(1, 1, 1e-6, {}, {}, {}, good, *mlp, qkv=fused)
    for rows in (order.flip(0).clone().index_fill_(0, torch.tensor([5]), 7), order + 1, order - 1):
        with pytest.raises(ValueError, match="qkv_rows must be a permutation of the qkv rows"):
            stack.add_layer(1, 1, 1e-6, {}, {}, {}, good, *mlp, qkv=fused, qkv_rows=rows.data_ptr())
    for bad, message in (({"q_norm_bias": 1}, "a head norm's bias needs the norm's weights"),
                         ({"q_norm": 1, "k_norm": 1, "head_norm_each": True, "head_norm_whole": True},
                          "head norms are per head or over the whole projection, not both"),
                         ({"k_norm": 1, "k_norm_bias": 1}, "an RMSNorm has no bias")):
        with pytest.raises(ValueError, match=message):
            stack.add_layer(1, 1, 1e-6, {}, {}, {}, good, *mlp, qkv=fused, qkv_rows=order.data_ptr(), **bad)
    assert stack.num_layers == 0
    moe = {"experts": 4, "top_k": 2, "expert_dim": 32, "router": 1, "gate_up": 1, "down": 1}
    for bad, message in (({"top_k": 5}, "top_k \\(<= experts\\)"), ({"expert_dim": 0}, "expert_dim must be positive"),
                         ({"down": 0}, "router, gate_up and down must not be null"),
                         ({"shared_gate": good, "shared_up": {**good, "N": 16}, "shared_down": good},
                          r"shared gate_proj must be \[16, 64\], got \[64, 64\]"),
                         ({"groups": 3}, "groups must split the experts in twos or more"),
                         ({"groups": 2, "top_groups": 3}, "top_groups \\(<= groups\\) hold the top k"),
                         ({"routed_scale": float("nan")}, "routed_scale finite"),
                         ({"swiglu_limit": 7.0}, "biases and the clamped SwiGLU are for input-major experts"),
                         ({"router_bias": 1}, "biases and the clamped SwiGLU are for input-major experts"),
                         ({"input_major": True, "swiglu_limit": -1.0}, "swiglu_limit finite and >= 0"),
                         ({"input_major": True, "swiglu_alpha": float("inf")}, "swiglu_alpha must be finite")):
        with pytest.raises(ValueError, match=message):
            stack.add_layer(1, 1, 1e-6, good, kv, kv, good, {}, {}, {}, moe={**moe, **bad})
    with pytest.raises(ValueError, match="a mixture of experts needs gated experts"):
        plain.add_layer(1, 1, 1e-6, good, kv, kv, good, {}, {}, {}, moe=moe)
    for cap in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="attn_softcap must be finite and >= 0"):
            _C.DecodeStack(64, 4, 2, 16, 128, 0.25, 0, cap)
    with pytest.raises(ValueError, match="residual_scale must be finite"):
        _C.DecodeStack(64, 4, 2, 16, 128, 0.25, residual_scale=float("nan"))
    with pytest.raises(ValueError, match=r"q_pos_period >= 0"):
        _C.DecodeStack(64, 4, 2, 16, 128, 0.25, q_pos_beta=0.1, q_pos_period=-1)
    with pytest.raises(ValueError, match="heads must be a multiple of kv_heads"):
        _C.DecodeStack(64, 4, 3, 16, 128, 0.25)
    with pytest.raises(ValueError, match="pos must be in"):
        stack.step(1, 8, 1, 8, 1, 1)


def test_position_tables_end_where_the_models_do():
    # GPT-2's learned rows, OPT's from row 2, XGLM's sinusoids from row 2 (and its scaled tokens).
    for family, positions in (("gpt2", "transformer.wpe"), ("opt", "model.decoder.embed_positions"),
                              ("xglm", "model.embed_positions")):
        model = family_model(family)
        decoder = NativeDecoder(model, 0, 2)
        last = model.config.max_position_embeddings - 1
        offset = 0 if family == "gpt2" else 2  # position p is row p + 2
        module = model.get_submodule(positions)
        table = module.weights if family == "xglm" else module.weight
        assert table.shape[0] == last + 1 + offset
        token = model.get_input_embeddings()(torch.tensor([7]))[0]
        assert torch.equal(decoder.embed(torch.tensor([[5, 7]]), last - 1)[0, 1], token + table[last + offset])
        with pytest.raises(ValueError, match=f"position {last + 1} is past the model's {last + 1} positions"):
            decoder.embed(torch.tensor([[5, 7]]), last)


def test_native_step_rejects_bad_tensors():
    model = tiny_model("llama", seed=1, num_layers=2, hidden=64, vocab=128)
    decoder = NativeDecoder(model, 0, 2, head="int8")
    cache = decoder.new_cache(lambda: DynamicCache(config=model.config))
    with pytest.raises(ValueError, match="logits must be a contiguous float32 tensor of the head's 128 rows"):
        decoder.step(torch.zeros(64), cache, torch.empty(127))
    with pytest.raises(ValueError, match="hidden must hold 64 values"):
        decoder.step(torch.zeros(63), cache)
    with pytest.raises(ValueError, match="head must be None or one of"):
        NativeDecoder(model, 0, 2, head="int4")
    with pytest.raises(ValueError, match="cannot truncate a cache of 0 positions to 1"):
        cache.truncate(1)
    decoder.step(torch.zeros(64), cache)
    with pytest.raises(ValueError, match="cannot truncate a cache of 1 positions to -1"):
        cache.truncate(-1)
    cache.truncate(0)
    assert cache.length == 0


@pytest.mark.parametrize("head", ["int8", "fp32"])
def test_split_greedy_equals_eager_split(head):
    model = tiny_model("llama", seed=7, num_layers=4)
    ids = _prompt(8, 6)
    config = SplitConfig(2, front=QuantConfig(bits=4, group_size=32))
    eager = split_model(copy.deepcopy(model), config, fast=False)
    fast = split_model(copy.deepcopy(model), config, fast_head=head)
    assert fast.edge.fast and fast.server.fast and not eager.edge.fast
    assert "fast=False" in eager.edge.fast_reason
    assert torch.equal(fast.generate(ids, 16), eager.generate(ids, 16))
    # Top-k sampling: the native head's exact top k through the same sampler as the eager
    # split's full logits, so a seed draws the same tokens.
    a = fast.generate(ids, 12, do_sample=True, top_k=5, temperature=1.5, seed=11)
    assert torch.equal(a, eager.generate(ids, 12, do_sample=True, top_k=5, temperature=1.5, seed=11))
    assert torch.equal(a, fast.generate(ids, 12, do_sample=True, top_k=5, temperature=1.5, seed=11))
    assert fast.last_metrics.edge_kv_bytes > 0


def test_split_of_an_uncovered_family_stays_eager():
    sm = split_model(family_model("ctrl"), 2)
    assert not sm.edge.fast and "'ctrl'" in sm.edge.fast_reason
    assert sm.generate(_prompt(5, 5, vocab=128), 4).shape == (1, 9)


@pytest.mark.parametrize("fmt, bits", [("int8", None), ("fp32", None), ("int8", 4)])
def test_native_head_alone_is_the_heads_exact_top_k(fmt, bits):
    # The head of a family whose layers stay eager: an nn.Linear (with a bias here) or a low-bit
    # head, near-tied rows that the W8A8 logits cannot order, on every int8 kernel.
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(64, 200))
    with torch.no_grad():
        w = model[0].weight
        w[1::2] = w[0::2] + 1e-4 * torch.randn_like(w[0::2])
    if bits:
        replace_linear(model, bits=bits, group_size=32)
    head = model[0]
    native = NativeHead(head, fmt)
    before = _C.lowbit_isa()
    try:
        for step, isa in enumerate(_C.lowbit_isas() * 3):
            _C.set_lowbit_isa(isa)
            hidden = torch.randn(64) * (1 + step)
            with torch.no_grad():
                ref = head(hidden)
            for k in (1, 7, 200):
                ids, values = native.top(hidden, k)
                ref_values, ref_ids = torch.topk(ref, k)
                assert torch.equal(ids, ref_ids), (isa, k)
                torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-5)
                # Three rows in one pass: each row as it is alone, bit for bit.
                rows = torch.stack([hidden, -hidden, hidden * 0.5])
                ids3, values3 = native.top_rows(rows, k)
                for i in range(3):
                    one_ids, one_values = native.top(rows[i], k)
                    assert torch.equal(ids3[i], one_ids) and torch.equal(values3[i], one_values), (isa, k, i)
    finally:
        _C.set_lowbit_isa(before)


def test_native_head_refuses_what_it_cannot_run():
    with pytest.raises(FastPathUnsupported, match="the LM head is a Embedding, not an nn.Linear"):
        NativeHead(torch.nn.Embedding(10, 8))
    with pytest.raises(FastPathUnsupported, match="the native head computes in float32; the LM head is torch.bfloat16"):
        NativeHead(torch.nn.Linear(8, 10).bfloat16())
    with pytest.raises(FastPathUnsupported, match=r"runs on the CPU; the LM head is on \['meta'\]"):
        NativeHead(torch.nn.Linear(8, 10, device="meta"))
    with pytest.raises(ValueError, match="fmt must be one of"):
        NativeHead(torch.nn.Linear(8, 10), "int4")
    native = NativeHead(torch.nn.Linear(8, 10))
    for k in (0, 11, True, 2.0):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, 10\]"):
            native.top(torch.zeros(8), k)
    with pytest.raises(ValueError, match=r"hidden must be \[rows >= 1, 8\], got \[1, 9\]"):
        native.top(torch.zeros(9), 1)
    with pytest.raises(ValueError, match=r"hidden must be \[rows >= 1, 8\], got \[0, 8\]"):
        native.top_rows(torch.zeros(0, 8), 1)


def test_uncovered_family_server_takes_its_token_from_the_native_head(monkeypatch):
    # CTRL's layers stay eager; its server runs them with the model's own forward up to the head,
    # then the native head's exact argmax / top k: the same tokens as the eager split's full logits.
    model = family_model("ctrl")
    ids = _prompt(8, 6, vocab=128)
    fast = split_model(copy.deepcopy(model), 2)
    eager = split_model(copy.deepcopy(model), 2, fast=False)
    assert not fast.server.fast and fast.server.native_head is not None and fast.server.head_reason is None
    assert eager.server.native_head is None and "fast=False" in eager.server.head_reason
    calls = []
    top_rows = fast.server.native_head.top_rows
    monkeypatch.setattr(fast.server.native_head, "top_rows", lambda h, k: calls.append(k) or top_rows(h, k))
    assert torch.equal(fast.generate(ids, 12), eager.generate(ids, 12))
    assert calls == [1] * 12  # every step, the prompt's too
    a = fast.generate(ids, 10, do_sample=True, top_k=5, temperature=1.5, seed=4)
    assert torch.equal(a, eager.generate(ids, 10, do_sample=True, top_k=5, temperature=1.5, seed=4))
    assert calls[12:] == [5] * 10


def _eager_layers_model(model_type: str, **overrides):
    """A tiny model of ``model_type`` from its own config with ``overrides``, seeded."""
    from transformers import AutoModelForCausalLM

    from splitkernels.models.tiny import tiny_config

    config = tiny_config(model_type, num_layers=4)
    for name, value in overrides.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type, overrides, logit_map", [
    ("cohere", {"hidden_act": "tanh"}, LogitMap(multiplier=0.0625)),  # an activation keeps the layers eager
    ("nanochat", {"final_logit_softcapping": TINY_SOFTCAP}, LogitMap(softcap=TINY_SOFTCAP)),
    ("granite_swa", {"logits_scaling": 3.0}, LogitMap(divisor=3.0))])
def test_server_native_head_applies_the_models_logit_map(model_type, overrides, logit_map):
    # The model's forward scales, divides or soft-caps its head's output, as a config field
    # names: the probe finds which, and the native head's top k carry the model's logits.
    model = _eager_layers_model(model_type, **overrides)
    ids = _prompt(8, 6, vocab=model.config.vocab_size)
    fast = split_model(copy.deepcopy(model), 2)
    eager = split_model(copy.deepcopy(model), 2, fast=False)
    assert not fast.server.fast and fast.server.native_head.logit_map == logit_map
    assert torch.equal(fast.generate(ids, 10), eager.generate(ids, 10))
    a = fast.generate(ids, 10, do_sample=True, top_k=5, temperature=1.5, seed=4)
    assert torch.equal(a, eager.generate(ids, 10, do_sample=True, top_k=5, temperature=1.5, seed=4))
    hidden = torch.randn(3, model.config.hidden_size)
    ids3, vals = fast.server.native_head.top_rows(hidden, 4)
    expected = model.get_output_embeddings()(hidden)
    logit_map.apply(expected)
    assert torch.allclose(vals, expected.gather(1, ids3), rtol=1e-5, atol=1e-6)


def test_server_keeps_a_head_whose_logits_the_model_transforms_otherwise():
    # A change after the head that no config names, or none that the config names (found by the
    # probe): the server keeps the model's own head, and says why.
    def doubled(module, args, out) -> None:
        out.logits.mul_(2.0)

    scaled = family_model("ctrl")
    scaled.register_forward_hook(doubled)
    sm = split_model(scaled, 1)
    assert sm.server.native_head is None
    assert sm.server.head_reason == "the model's logits are not its LM head's output as it is"
    named = _eager_layers_model("cohere", hidden_act="tanh")
    named.register_forward_hook(doubled)
    sm = split_model(named, 1)
    assert sm.server.native_head is None
    assert sm.server.head_reason == ("the model's logits are not its LM head's output as it is nor as "
                                     "logit_scale = 0.0625 maps it")
    sm = split_model(_eager_layers_model("cohere", use_qk_norm=True, logit_scale=-1.0), 1)
    assert sm.server.native_head is None
    assert sm.server.head_reason == "the model transforms its LM head's output (logit_scale = -1.0)"


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="SmolLM2 package not installed")
def test_smollm2_split_greedy_equals_eager_split():
    from splitkernels.models import load_smollm2

    model, tokenizer = load_smollm2()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    config = SplitConfig(29, front=QuantConfig(bits=4, group_size=32))
    fast = split_model(model, config)
    assert fast.edge.fast and fast.server.fast
    out = fast.generate(ids, 12)
    fast.close()
    eager = split_model(model, SplitConfig(29), fast=False)  # already quantised in place
    assert torch.equal(out, eager.generate(ids, 12))
