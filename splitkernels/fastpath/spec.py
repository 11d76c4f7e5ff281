"""Which models the native decode step covers, read from the model's own modules and config.

The native step (csrc/cpu/decode/) implements one layer shape: pre-norm RMSNorm, Q/K/V
projections (biases allowed), rotary embeddings from a position-independent frequency table,
grouped-query softmax attention over every earlier position or a sliding window of them, an
output projection, and a gated MLP (``down(act(gate(x)) * up(x))``), with residuals; and the
variants of it that ``_FAMILIES`` names per family: LayerNorms instead of RMSNorms, norms of
1 + w, norms after the sublayers (with or without the ones before), query and key norms per
head or over the whole projection, attention and MLP in parallel, MLPs without a gate, soft-
capped scores and logits, rotary tables per layer type or switching at the original context
(longrope), layers without rotary, rotary over interleaved pairs or over part of each head,
ALiBi, position tables, a norm of the embeddings, fused projections, clamped projections,
Granite's multipliers. A model is described only when
every layer of the requested range has exactly that shape; otherwise
:class:`FastPathUnsupported` says why, and the caller keeps the model's own (eager) forward.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..models.layout import decoder_layers, find_decoder_layers, text_config
from ..nn.linear import QuantLinear, dense_weight, is_plain_linear


@dataclass(frozen=True)
class _Family:
    """How a family's decoder layer departs from llama's (each checked against its forward)."""

    norm_offset: float = 0.0  # RMSNorms scale by norm_offset + w
    norms: str = "pre"  # _NORMS: which norms a layer has, by role
    # Norms of each query and key head before rotary, of the layers' norm kind: "always", or
    # where the config flag of that name says so (StableLM's qk_layernorm); "" none.
    head_norms: str = ""
    head_norm_names: tuple[str, str] = ("q_norm", "k_norm")  # the attention's modules of them
    head_norm_whole: bool = False  # ... of each row's whole query / key projection instead
    act_field: str = "hidden_act"  # the config field naming the MLP activation
    activation: str = ""  # the MLP's activation where the config names none (Bloom's, MPT's)
    pre_attn_scalar: bool = False  # attention scale query_pre_attn_scalar ** -0.5 (else head_dim ** -0.5)
    rope_per_type: bool = False  # a rotary table per layer type
    softcaps: bool = False  # the forward soft-caps attention scores and logits where the config says
    all_slide: bool = False  # every layer slides when sliding_window is set (layer_types aside)
    # Layers without rotary: "no_rope_layers" where that config list says 0 (SmolLM3), "global"
    # the full-attention layers of a model with sliding ones (EXAONE 4), "" none; with
    # position_embedding all of them.
    nope: str = ""
    # The decoder's position embedding of this name, added to the token embeddings: a table of
    # learned rows (GPT-2's wpe; OPT's embed_positions, whose rows start at its `offset`) or of
    # sinusoids (XGLM's `weights`); "" none.
    position_embedding: str = ""
    requires: tuple[str, ...] = ()  # config flags that must be set (OPT's do_layer_norm_before)
    forbids: tuple[str, ...] = ()  # ... and that must not (Bloom's residual from the normed input)
    absent: tuple[str, ...] = ()  # decoder modules the forward would apply, which must be None (OPT's project_in)
    window_attr: bool = True  # the attention's own sliding_window is its layer's window (or None)
    rope_interleaved: bool = False  # rotary pairs (2i, 2i + 1) rather than halves
    # Granite's attention scale, residual, embedding and logit multipliers: "divide" the logits
    # by logits_scaling (Granite) or "multiply" them (HyperCLOVA X); "" none.
    multipliers: str = ""
    llama4_query_scale: bool = False  # queries scale with the position past the original context
    fused_qkv: str = ""  # one projection of this name instead of q/k/v_proj, its rows q, k, v (Phi-3's qkv_proj)
    # One projection of this name instead, its output grouped by key/value head: the group's query
    # heads, its key, its value (GPT-NeoX's query_key_value); "" none.
    grouped_qkv: str = ""
    # ... or in this many shards (the attention's attribute of this name), each the query, value
    # and key rows of its share of the heads (CodeGen's mp_num); "" none.
    qkv_shards: str = ""
    attn_name: str = "self_attn"  # the layer's attention module
    # config.multi_query: one key/value head, else one for each query head (GPTBigCode, whose
    # modules do not read num_key_value_heads).
    multi_query: bool = False
    # Where this config flag is set, config.num_kv_heads key/value heads, each broadcast to its
    # query heads before the cache (Falcon's new_decoder_architecture); "" none.
    broadcast_kv: str = ""
    fused_mlp: bool = False  # one gate_up_proj instead of gate_proj and up_proj (Phi-3, GLM)
    plain_mlp: tuple[str, str] | None = None  # an MLP down(act(up(x))) without a gate: (up, down) names
    o_name: str = "o_proj"  # the attention's output projection
    final_norm: str = "norm"  # the final norm, beside the layers
    # LayerNorms, (x - mean) / std * w + b (weight and bias optional), instead of RMSNorms; with
    # norm_eps their epsilon when the norm modules hold none (OLMo's forward fixes 1e-5).
    layer_norm: bool = False
    norm_eps: float | None = None
    # Attention and MLP both read the layer's one normed input ("always"; or where the config
    # flag of that name says so), the layer returning h + attn + mlp (Phi, Cohere, StableLM).
    parallel: str = ""
    # _NORMS of a parallel layer ("pre": an MLP norm of its own, GPT-NeoX); the first of them whose
    # input norm the layer has (Falcon's two norms, or one).
    parallel_norms: tuple[str, ...] = ("parallel",)
    rope_table_repeated: bool = False  # the rotary table repeats each angle in place (Cohere), not twice over
    # The rotary module returns each angle's value once, as (cos, sin) (gpt-oss) or (sin, cos)
    # (GPT-J), where the native tables hold them twice over; "" as the native tables.
    rope_once: str = ""
    logit_scale: bool = False  # the forward multiplies the logits by config.logit_scale (Cohere)
    clip_qkv: str = ""  # the config field (a dotted path) whose value clamps queries, keys and values (OLMo)
    # ALiBi instead of rotary: the decoder's method that builds the biases (Bloom's
    # build_alibi_tensor, MPT's build_mpt_alibi_tensor); "" none.
    alibi: str = ""
    embed_norm: str = ""  # the decoder's norm of the token embeddings (Bloom's); "" none
    scale_attr: str = "scaling"  # the attention's scale of its scores, as its module names it
    scale_field: str = ""  # the config field (a dotted path) that sets it where not head_dim ** -0.5 (MPT)
    # Layers whose MLP is a router and experts: their top k's probabilities renormalised to sum 1
    # "always" (Mixtral) or where the router's norm_topk_prob says; "" none.
    moe: str = ""
    # How the router scores and picks experts: "softmax" over all; "sigmoid" of each logit (Flint);
    # "grouped", DeepSeek-V3's: sigmoids picked with a correction bias among the best groups,
    # scaled by routed_scaling_factor (GLM 4 MoE); "logit_choice": sigmoids of the top k by logit
    # plus a correction bias (Kolibri).
    router: str = "softmax"
    # The layer's MLP (or mixture of experts) module; "": the layer holds plain_mlp's projections and
    # its activation_fn (OPT).
    mlp_name: str = "mlp"
    router_name: str = "gate"  # a mixture of experts' router
    sinks: bool = False  # the attention's own `sinks` [heads]: one more softmax logit per head (Flint)
    # Experts whose 3-D weights are input-major: "alternating" gate and up columns with biases, a
    # biased router and the clamped SwiGLU of the experts' alpha and limit (gpt-oss), or the gate's
    # columns then the up's, "halves" (Aria's, always SiLU); "" none.
    input_major_experts: str = ""
    # A gated MLP of the layer's beside its mixture of experts, added in full, its gate and up one
    # projection (Granite MoE Shared's shared_mlp of input_linear and output_linear); "" none.
    shared_mlp: str = ""


# A layer's norms by module name in their roles: of the attention's input, of its output
# (before the residual add), of the MLP's input, of its output; None where the family has none.
# Before each sublayer (llama), before and after each (Gemma's sandwich, where
# post_attention_layernorm norms the attention's output; GLM 4's and HyperCLOVA X's names for
# it), after each only (OLMo 2), before each with Gemma's names (VaultGemma).
_NORMS = {
    "pre": ("input_layernorm", None, "post_attention_layernorm", None),
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
    "glm4": ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"),
    "peri": ("input_layernorm", "post_norm1", "post_attention_layernorm", "post_norm2"),
    "post": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),
    "parallel": ("input_layernorm", None, None, None),  # the MLP takes the attention's normed input
    "pre_feedforward": ("input_layernorm", None, "pre_feedforward_layernorm", None),
    "gpt2": ("ln_1", None, "ln_2", None),
    "opt": ("self_attn_layer_norm", None, "final_layer_norm", None),
    "mpt": ("norm_1", None, "norm_2", None),
    "falcon": ("ln_attn", None, "ln_mlp", None),  # a parallel layer's two norms
    "gptj": ("ln_1", None, None, None),  # a parallel layer's one
}

_COHERE = dict(layer_norm=True, parallel="always", rope_interleaved=True, rope_table_repeated=True, logit_scale=True)
_GRANITE_MOE = dict(multipliers="divide", mlp_name="block_sparse_moe", router_name="router", moe="always")
_GPT2 = dict(layer_norm=True, norms="gpt2", attn_name="attn", o_name="c_proj", plain_mlp=("c_fc", "c_proj"),
             final_norm="ln_f", act_field="activation_function", position_embedding="wpe")
_QK_LAYERNORM = dict(head_norms="qk_layernorm", head_norm_names=("q_layernorm", "k_layernorm"))
_NEOX_MLP = dict(plain_mlp=("dense_h_to_4h", "dense_4h_to_h"), grouped_qkv="query_key_value", o_name="dense")
_GEMMA = dict(norm_offset=1.0, norms="sandwich", act_field="hidden_activation", pre_attn_scalar=True, softcaps=True)
# Families whose decoder layer's forward was checked against the native step (tests compare
# the two). Another family with the same module names may still differ in its forward (scaled
# embeddings, norms of 1 + w, extra norms), so it is declined rather than guessed at.
_FAMILIES = {
    "llama": _Family(),
    # Configs of their own that transformers runs with llama's model class.
    "exaone": _Family(), "internlm3": _Family(), "iquestcoder": _Family(),
    "cwm": _Family(),
    "seed_oss": _Family(),
    "mistral": _Family(all_slide=True),
    "qwen2": _Family(),
    "qwen3": _Family(head_norms="always"),
    "smollm3": _Family(nope="no_rope_layers"),
    "exaone4": _Family(norms="post", head_norms="always", nope="global", window_attr=False),
    "olmo2": _Family(norms="post", head_norms="always", head_norm_whole=True),
    "helium": _Family(rope_interleaved=True),
    "ernie4_5": _Family(rope_interleaved=True),
    "granite": _Family(multipliers="divide"),
    "ministral3": _Family(llama4_query_scale=True),
    "phi3": _Family(fused_qkv="qkv_proj", fused_mlp=True, all_slide=True),
    "olmo3": _Family(norms="post", head_norms="always", head_norm_whole=True, rope_per_type=True),
    "glm": _Family(fused_mlp=True, rope_interleaved=True),
    "glm4": _Family(fused_mlp=True, rope_interleaved=True, norms="glm4"),
    "hyperclovax": _Family(multipliers="multiply", norms="peri"),
    "arcee": _Family(plain_mlp=("up_proj", "down_proj")),
    "olmo": _Family(layer_norm=True, norm_eps=1e-5, clip_qkv="clip_qkv"),
    "stablelm": _Family(layer_norm=True, parallel="use_parallel_residual", **_QK_LAYERNORM),
    "starcoder2": _Family(layer_norm=True, plain_mlp=("c_fc", "c_proj"), all_slide=True),
    "jais2": _Family(layer_norm=True, plain_mlp=("up_proj", "down_proj")),
    "phi": _Family(layer_norm=True, parallel="always", plain_mlp=("fc1", "fc2"), o_name="dense",
                   final_norm="final_layernorm", **_QK_LAYERNORM),
    "cohere": _Family(**_COHERE, head_norms="use_qk_norm"),
    "cohere2": _Family(**_COHERE, nope="global"),
    "gpt_neox": _Family(layer_norm=True, parallel="use_parallel_residual", parallel_norms=("pre",),
                        attn_name="attention", final_norm="final_layer_norm", **_NEOX_MLP),
    "persimmon": _Family(layer_norm=True, final_norm="final_layernorm", **_NEOX_MLP, **_QK_LAYERNORM),
    "gpt2": _Family(**_GPT2, fused_qkv="c_attn"),
    # One key/value head (multi_query) is the grouped layout of one group: the rows q, k, v.
    "gpt_bigcode": _Family(**_GPT2, grouped_qkv="c_attn", multi_query=True),
    "opt": _Family(layer_norm=True, norms="opt", o_name="out_proj", mlp_name="", plain_mlp=("fc1", "fc2"),
                   final_norm="final_layer_norm", act_field="activation_function", position_embedding="embed_positions",
                   requires=("do_layer_norm_before",), absent=("project_in", "project_out")),
    "xglm": _Family(layer_norm=True, norms="opt", o_name="out_proj", mlp_name="", plain_mlp=("fc1", "fc2"),
                    final_norm="layer_norm", act_field="activation_function", position_embedding="embed_positions"),
    "biogpt": _Family(layer_norm=True, norms="opt", o_name="out_proj", mlp_name="", plain_mlp=("fc1", "fc2"),
                      final_norm="layer_norm", position_embedding="embed_positions"),
    # ALiBi: Bloom's biases from the positions' count, MPT's back from the last (the same up to a
    # constant, which a softmax ignores).
    "bloom": _Family(layer_norm=True, attn_name="self_attention", **_NEOX_MLP, final_norm="ln_f",
                     activation="gelu_pytorch_tanh", alibi="build_alibi_tensor", embed_norm="word_embeddings_layernorm",
                     scale_attr="inv_norm_factor", forbids=("apply_residual_connection_post_layernorm",)),
    # Falcon's qkv grouped as GPT-NeoX's (per head, the query heads then one key/value head, or
    # per key/value group); its newer layout caches every key/value head once per query head. Its
    # ALiBi configs round the biases to bfloat16 at absolute positions, which the native step does not.
    "falcon": _Family(layer_norm=True, attn_name="self_attention", **_NEOX_MLP, final_norm="ln_f",
                      act_field="activation", parallel="parallel_attn", parallel_norms=("falcon", "parallel"),
                      multi_query=True, broadcast_kv="new_decoder_architecture", scale_attr="inv_norm_factor",
                      forbids=("alibi",)),
    "codegen": _Family(layer_norm=True, parallel="always", parallel_norms=("gptj",), attn_name="attn",
                       o_name="out_proj", plain_mlp=("fc_in", "fc_out"), final_norm="ln_f",
                       act_field="activation_function", rope_interleaved=True, rope_once="sin, cos",
                       grouped_qkv="qkv_proj", qkv_shards="mp_num"),
    "gptj": _Family(layer_norm=True, parallel="always", parallel_norms=("gptj",), attn_name="attn", o_name="out_proj",
                    plain_mlp=("fc_in", "fc_out"), final_norm="ln_f", act_field="activation_function",
                    rope_interleaved=True, rope_once="sin, cos"),
    "mpt": _Family(layer_norm=True, norms="mpt", attn_name="attn", fused_qkv="Wqkv", o_name="out_proj",
                   mlp_name="ffn", plain_mlp=("up_proj", "down_proj"), final_norm="norm_f", activation="gelu",
                   alibi="build_mpt_alibi_tensor", scale_attr="softmax_scale", scale_field="attn_config.softmax_scale",
                   clip_qkv="attn_config.clip_qkv"),
    "mixtral": _Family(moe="always"),
    # A softmax over the top k's logits (gpt-oss's router) is the renormalised top k of the softmax over all.
    "gpt_oss": _Family(moe="always", router_name="router", sinks=True, input_major_experts="alternating",
                       rope_once="cos, sin"),
    "qwen2_moe": _Family(moe="norm_topk_prob"),
    "qwen3_moe": _Family(moe="norm_topk_prob", head_norms="always"),
    "olmoe": _Family(moe="norm_topk_prob", head_norms="always", head_norm_whole=True),
    "flex_olmo": _Family(norms="post", head_norms="always", head_norm_whole=True, moe="norm_topk_prob"),
    # A softmax over the top k's logits is the renormalised top k of the softmax over all.
    "granitemoe": _Family(**_GRANITE_MOE),
    "granitemoeshared": _Family(**_GRANITE_MOE, shared_mlp="shared_mlp"),
    "glm4_moe": _Family(moe="norm_topk_prob", router="grouped"),
    # Its full-attention layers keep the config's window on their module but attend over all.
    "kolibri1": _Family(norms="glm4", head_norms="always", moe="norm_topk_prob", router="logit_choice",
                        nope="global", window_attr=False),
    "solar_open": _Family(moe="norm_topk_prob", router="grouped"),
    "aria_text": _Family(moe="always", router_name="router", input_major_experts="halves"),
    "sarvam_moe": _Family(moe="norm_topk_prob", router="grouped", head_norms="always"),
    "minimax_m2": _Family(moe="always", router="grouped", head_norms="always", head_norm_whole=True),
    "hy_v3": _Family(moe="always", router="grouped", head_norms="always"),
    "mellum": _Family(moe="norm_topk_prob", head_norms="always", rope_per_type=True),
    "exaone_moe": _Family(moe="norm_topk_prob", router="grouped", head_norms="always", nope="global",
                          window_attr=False),
    "flint": _Family(moe="norm_topk_prob", router="sigmoid", head_norms="always", sinks=True, nope="global"),
    "gemma": _Family(norm_offset=1.0),
    "gemma2": _Family(**_GEMMA),
    "vaultgemma": _Family(**{**_GEMMA, "norms": "pre_feedforward"}),
    "gemma3_text": _Family(**_GEMMA, head_norms="always", rope_per_type=True),
}
FAST_FAMILIES = tuple(_FAMILIES)
# Rotary types whose cos/sin depend on the position only (so one table serves every step).
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
# longrope: the module's short frequencies while the sequence is within the original context,
# its long ones past it; a decode step at position p sees p + 1 positions, so the table switches
# at original_max_position_embeddings.
_SWITCHED_ROPE = "longrope"
# Routers whose choice adds a correction bias (read with them, _grouped_choice).
_BIASED_ROUTERS = ("grouped", "logit_choice")
# The MLP activations the native step has (csrc/cpu/decode/decode.h DecodeActivation);
# transformers' gelu_new is the same tanh approximation as gelu_pytorch_tanh.
_ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "relu2": 2, "gelu": 3, "relu": 4}
_LAYER_TYPES = ("full_attention", "sliding_attention")
# The rotary "table" of a layer without rotary embeddings (cos 1, sin 0: the identity).
NO_ROPE = "no rotary"


@dataclass(frozen=True)
class RowSlice:
    """Output rows ``start..stop-1`` of a fused linear layer (Phi-3's qkv_proj and gate_up_proj)."""

    linear: nn.Module
    start: int
    stop: int


class FastPathUnsupported(ValueError):
    """The model (or the requested layers) has a shape the native decode step does not cover;
    the message says what, and the eager path runs instead."""


@dataclass(frozen=True)
class Experts:
    """A mixture of experts in place of a layer's MLP (csrc/cpu/decode/decode.h DecodeMoE)."""

    router: torch.Tensor  # fp32 [experts, hidden]
    # fp32 [experts, 2 width, hidden]: each expert's gate rows, then its up rows (input_major:
    # [experts, hidden, 2 width], gate and up columns alternating)
    gate_up: torch.Tensor
    down: torch.Tensor  # fp32 [experts, hidden, width] (input_major: [experts, width, hidden])
    top_k: int
    renormalize: bool  # the top k's probabilities divided by their sum
    sigmoid: bool  # each expert's score is its logit's sigmoid, not a softmax over all
    # The shared expert's gate, up and down, and the linear of its sigmoid gate (None: added in full).
    shared: tuple[nn.Module | RowSlice, nn.Module | RowSlice, nn.Module, nn.Module | None] | None
    # DeepSeek-V3's choice: by score + choice_bias among the top_groups best of `groups` groups,
    # the weights scaled by routed_scale.
    choice_bias: torch.Tensor | None = None
    groups: int = 1
    top_groups: int = 1
    routed_scale: float = 1.0
    choose_by_logit: bool = False  # ... by logit + choice_bias instead (Kolibri)
    input_major: bool = False  # gpt-oss's and Aria's layout (csrc/cpu/decode/decode.h DecodeMoE)
    alternate: bool = False  # ... its gate and up columns alternating (gpt-oss)
    gate_up_bias: torch.Tensor | None = None  # fp32 [experts, 2 width]
    down_bias: torch.Tensor | None = None  # fp32 [experts, hidden]
    router_bias: torch.Tensor | None = None  # fp32 [experts]
    swiglu_alpha: float = 0.0
    swiglu_limit: float = 0.0  # > 0: the clamped SwiGLU


@dataclass(frozen=True)
class HeadNorm:
    """The norm of each query or key head (or of the whole projection): its weight ``[width]`` shared
    by every head, or with ``each`` one row per head ``[heads, head_dim]`` (StableLM's, Cohere's),
    and a LayerNorm's bias of the same shape (None: the norm has none)."""

    weight: torch.Tensor  # ones for a LayerNorm without weights
    bias: torch.Tensor | None
    each: bool = False


@dataclass(frozen=True)
class LayerModules:
    """The modules of one decoder layer the native step reads."""

    input_norm: nn.Module | None  # of the attention's input (None: the input as it is)
    # Of the MLP's input (None: as it is; in a parallel layer the attention's normed input, and a
    # parallel layer's own norm takes the layer's input, GPT-NeoX).
    post_norm: nn.Module | None
    q: nn.Module | RowSlice | None  # None: the layer's one grouped qkv projection
    k: nn.Module | RowSlice | None
    v: nn.Module | RowSlice | None
    o: nn.Module
    gate: nn.Module | RowSlice | None  # None: the MLP has no gate (or is a mixture of experts)
    up: nn.Module | RowSlice | None
    down: nn.Module | None
    q_norm: HeadNorm | None = None  # per query / key head, before rotary
    k_norm: HeadNorm | None = None
    attn_out_norm: nn.Module | None = None  # of the attention's / MLP's output, before the residual add
    mlp_out_norm: nn.Module | None = None
    window: int = 0  # sliding window (positions attended, this one included); 0: all
    rope: int = 0  # index of the layer's rotary table in DecoderDescription.rope_types
    eps: float = 1e-6  # every norm's epsilon
    head_norm_whole: bool = False  # q_norm / k_norm span each row's whole projection
    experts: Experts | None = None  # a mixture of experts instead of gate / up / down
    sinks: torch.Tensor | None = None  # fp32 [heads]: each query head's attention sink
    qkv: nn.Module | None = None  # one projection of q, k and v in the family's order (_Family.grouped_qkv)
    qkv_rows: torch.Tensor | None = None  # int64: row r of qkv's output is value qkv_rows[r] of q | k | v


@dataclass(frozen=True)
class DecoderDescription:
    """Sizes and modules of a model's decoder as the native step needs them."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    attn_scale: float
    layers: tuple[LayerModules | None, ...]  # None: a layer this process freed
    rotary: nn.Module | None  # None: no layer has rotary
    final_norm: nn.Module
    lm_head: nn.Module
    act: int = 0  # _ACTIVATIONS
    norm_offset: float = 0.0  # RMSNorms scale by norm_offset + w
    rope_types: tuple[str | None, ...] = (None,)  # rotary tables (None: the rotary module's only one;
    # NO_ROPE: the identity)
    attn_softcap: float = 0.0  # attention scores s become attn_softcap tanh(s / attn_softcap); 0: none
    logit_softcap: float = 0.0  # the same of the LM head's logits
    rope_interleaved: bool = False  # rotary pairs (2i, 2i + 1) rather than halves (i, i + rotary_dim / 2)
    rotary_dim: int = 0  # rotary turns each head's first rotary_dim values (partial rotary); 0: all
    residual_scale: float = 1.0  # each sublayer adds residual_scale times its output
    embed_scale: float = 1.0  # the model's forward multiplies the token embeddings by it
    logit_divisor: float = 1.0  # ... and divides the LM head's logits by it
    logit_multiplier: float = 1.0  # ... or multiplies them by this
    layer_norm: bool = False  # every norm is a LayerNorm (its weight and bias optional)
    final_eps: float = 1e-6  # the final norm's epsilon
    parallel: bool = False  # the MLP takes the attention's normed input; no norm of its own
    gated: bool = True  # the MLP is down(act(gate(x)) * up(x)); else down(act(up(x)))
    clip_qkv: float = 0.0  # queries, keys and values clamped to [-clip_qkv, clip_qkv]; 0: none
    rope_table_repeated: bool = False  # the rotary module's tables repeat each angle in place
    rope_switch: int = 0  # longrope: rows from this position on come from the module's long frequencies
    # Queries at position p scale by 1 + q_pos_beta log(1 + floor(p / q_pos_period)); 0: none.
    q_pos_beta: float = 0.0
    q_pos_period: int = 0
    positions: torch.Tensor | None = None  # [rows, hidden]: the position embeddings the forward adds (GPT-2)
    position_offset: int = 0  # position p's row in them is p + position_offset (OPT: 2)
    alibi: torch.Tensor | None = None  # fp32 [heads]: ALiBi's slopes (no rotary then)
    embed_norm: nn.Module | None = None  # the norm the forward applies to the token embeddings (Bloom)
    cache_repeats: int = 1  # the model's cache holds each key/value head this many times (Falcon's newer layout)


def norm_eps(module: nn.Module, fixed: float | None = None) -> float:
    """A norm's epsilon, by either of the names transformers' norms give it, or ``fixed`` for a
    family whose norm modules hold none."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", fixed))
    if eps is None:
        raise FastPathUnsupported(f"the {type(module).__name__} names no epsilon")
    return float(eps)


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return "default"
    if params and all(isinstance(v, dict) for v in params.values()):  # per layer type: not one table
        return "per-layer-type"
    return str(params.get("rope_type", params.get("type", "default")))


def _linear_ok(name: str, module: nn.Module, out_features: int, in_features: int) -> None:
    if isinstance(module, QuantLinear):
        n, k = module.out_features, module.in_features
    elif is_plain_linear(module):  # an nn.Linear or a Conv1D (its weight transposed)
        n, k = dense_weight(module)[0].shape
    else:
        raise FastPathUnsupported(f"{name} is a {type(module).__name__}, not an nn.Linear or QuantLinear")
    if (n, k) != (out_features, in_features):
        raise FastPathUnsupported(f"{name} is [{n}, {k}], expected [{out_features}, {in_features}]")


def _norm_ok(name: str, module: nn.Module, hidden: int, layer_norm: bool = False, eps: float | None = None,
             fixed_eps: float | None = None, shape: tuple[int, ...] | None = None) -> None:
    """``module`` is an RMSNorm with its weight (or with ``layer_norm`` a LayerNorm whose weight and
    bias are optional) over ``hidden`` values, with epsilon ``eps`` where given (``fixed_eps``:
    the family's, for norm modules that hold none); ``shape``: its weight's and bias's (default
    ``(hidden,)``; Cohere's head norms have a row for each head)."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    normed = tuple(getattr(module, "normalized_shape", (hidden,)))
    shape = shape or (hidden,)
    params = {n for n, _ in module.named_parameters()}
    kind = "LayerNorm" if layer_norm else "RMSNorm"
    if layer_norm:
        ok = all(t is None or (isinstance(t, torch.Tensor) and t.shape == shape) for t in (weight, bias)) \
            and normed == (hidden,) and params <= {"weight", "bias"}
    else:
        ok = isinstance(weight, torch.Tensor) and weight.shape == shape and params == {"weight"}
    if not type(module).__name__.endswith(kind) or not ok:
        raise FastPathUnsupported(f"{name} is a {type(module).__name__}, not {'a' if layer_norm else 'an'} {kind} "
                                  f"of width {hidden}")
    if eps is not None and norm_eps(module, fixed_eps) != eps:
        raise FastPathUnsupported(f"{name} has epsilon {norm_eps(module, fixed_eps)}, the layer's other norms {eps}")


def _layer_modules(i: int, layer: nn.Module, d: dict, fam: _Family, window: int, rope: int,
                   parallel: bool, head_norms: bool) -> LayerModules:
    attn = getattr(layer, fam.attn_name, None)
    if fam.mlp_name:
        mlp = getattr(layer, fam.mlp_name, None)
        mlp_names = {fam.mlp_name: mlp}
    else:  # the layer holds the MLP's projections (and activation) itself (OPT's fc1, fc2): an MLP of them
        mlp_names = {n: getattr(layer, n, None) for n in (*fam.plain_mlp, "activation_fn")}
        mlp = nn.ModuleDict({n: m for n, m in mlp_names.items() if m is not None})
    # Families with optional norms keep an nn.Identity where a config leaves one out.
    layouts = [_NORMS[n] for n in (fam.parallel_norms if parallel else (fam.norms,))]
    layout = next((lay for lay in layouts if lay[0] and hasattr(layer, lay[0])), layouts[-1])
    roles = [getattr(layer, n, None) if n else None for n in layout]
    into_attn, out_attn, into_mlp, out_mlp = (None if isinstance(m, nn.Identity) else m for m in roles)
    norm_names = [n for n in layout if n]
    head_norm_names = fam.head_norm_names if head_norms else ()
    names = {fam.attn_name: attn, **mlp_names, **{n: getattr(layer, n, None) for n in norm_names}}
    shared = getattr(layer, fam.shared_mlp, None) if fam.shared_mlp else None  # None where a config has none
    if shared is not None:
        names[fam.shared_mlp] = shared
    missing = [n for n, m in names.items() if m is None]
    if missing:
        raise FastPathUnsupported(f"layer {i} has no {', '.join(missing)}")
    # Dropout modules (Phi-3's residual dropout) do nothing in an evaluating model.
    extra = sorted(n for n, m in layer.named_children()
                   if n not in names and not (isinstance(m, nn.Dropout) and (not m.training or m.p == 0)))
    if extra:
        raise FastPathUnsupported(f"layer {i} has modules the native step lacks: {', '.join(extra)}")
    # Weights held by the layer, attention or MLP module itself (Granite SWA's attention sinks).
    own = sorted(f"{where}.{n}" for where, m in (("layer", layer), ("attention", attn), ("MLP", mlp))
                 for n, _ in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)))
    if fam.router in _BIASED_ROUTERS and "MLP.e_score_correction_bias" in own:  # read with the router (MiniMax M2)
        own.remove("MLP.e_score_correction_bias")
    sinks = getattr(attn, "sinks", None) if fam.sinks else None
    if sinks is not None:
        own.remove("attention.sinks")
        if not isinstance(sinks, torch.Tensor) or sinks.shape != (d["heads"],) or sinks.dtype != torch.float32:
            raise FastPathUnsupported(f"layer {i} attention sinks are not fp32 [{d['heads']}]")
    if own:
        raise FastPathUnsupported(f"layer {i} has weights the native step lacks: {', '.join(own)}")
    projections = ((fam.grouped_qkv,) if fam.grouped_qkv else (fam.fused_qkv,) if fam.fused_qkv
                   else ("q_proj", "k_proj", "v_proj"))
    extra = _children_with_weights(attn) - {*projections, fam.o_name} - set(head_norm_names)
    if extra:
        raise FastPathUnsupported(f"layer {i} attention has weights the native step lacks: {', '.join(sorted(extra))}")
    h, qd, kvd, f = d["hidden"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"], d["intermediate"]
    # Fused projections: the rows of q, k and v, or of gate and up, one after another.
    qkv = getattr(attn, fam.grouped_qkv) if fam.grouped_qkv else None
    qkv_rows = None
    if qkv is not None:
        _linear_ok(f"layer {i} {fam.grouped_qkv}", qkv, qd + 2 * kvd, h)
        q = k = v = None
        qkv_rows = _qkv_rows(i, attn, fam, d["heads"], d["kv_heads"], d["head_dim"])
    elif fam.fused_qkv:
        fused = getattr(attn, fam.fused_qkv)
        _linear_ok(f"layer {i} {fam.fused_qkv}", fused, qd + 2 * kvd, h)
        q, k, v = (RowSlice(fused, a, b) for a, b in ((0, qd), (qd, qd + kvd), (qd + kvd, qd + 2 * kvd)))
    else:
        q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
        for name, module, shape in (("q_proj", q, (qd, h)), ("k_proj", k, (kvd, h)), ("v_proj", v, (kvd, h))):
            _linear_ok(f"layer {i} {name}", module, *shape)
    gate, up, down, experts = _mlp_modules(i, mlp, fam, h, f, shared)
    o = getattr(attn, fam.o_name)
    _linear_ok(f"layer {i} {fam.o_name}", o, h, qd)
    norms = {n: m for n, m in zip(layout, (into_attn, out_attn, into_mlp, out_mlp)) if m is not None}
    if not norms:
        raise FastPathUnsupported(f"layer {i} has no norms")
    eps = norm_eps(next(iter(norms.values())), fam.norm_eps)
    for n, m in norms.items():
        _norm_ok(f"layer {i} {n}", m, h, fam.layer_norm, eps, fam.norm_eps)
    q_norm = k_norm = None
    if head_norm_names:
        q_norm, k_norm = (_head_norm(f"layer {i} {n}", getattr(attn, n, None), count, d["head_dim"], fam, eps)
                          for n, count in zip(head_norm_names, (d["heads"], d["kv_heads"])))
    scaling = getattr(attn, fam.scale_attr, None)
    if not isinstance(scaling, float) or abs(scaling - d["attn_scale"]) > 1e-12 * d["attn_scale"]:
        raise FastPathUnsupported(f"layer {i} attention {fam.scale_attr} is {scaling!r}, expected {d['attn_scale']!r}")
    # Families that keep the window on the attention module: it must be the one the config gave.
    own = getattr(attn, "sliding_window", None)
    if fam.window_attr and hasattr(attn, "sliding_window") and int(own or 0) != window:
        raise FastPathUnsupported(f"layer {i} attention slides over {own!r} positions, the config {window or None!r}")
    return LayerModules(into_attn, into_mlp, q, k, v, o, gate, up, down, q_norm, k_norm, out_attn, out_mlp, window,
                        rope, eps, fam.head_norm_whole, experts, sinks, qkv, qkv_rows)


def _qkv_rows(i: int, attn: nn.Module, fam: _Family, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Where each row of a layer's one q, k and v projection goes in q | k | v: grouped by
    key/value head (its query heads, its key, its value), or in the attention's shards (each its
    query, value and key rows, CodeGen's)."""
    qd, kvd = heads * head_dim, kv_heads * head_dim
    q, k, v = torch.arange(qd), qd + torch.arange(kvd), qd + kvd + torch.arange(kvd)
    if fam.qkv_shards:
        shards = getattr(attn, fam.qkv_shards, None)
        if not _is_count(shards) or kv_heads != heads or heads % shards:
            raise FastPathUnsupported(f"layer {i} qkv in {shards!r} shards does not split {heads} heads "
                                      "of their own keys and values")
        return torch.cat([t for part in zip(*(x.chunk(shards) for x in (q, v, k))) for t in part])
    return torch.cat([t for part in zip(q.chunk(kv_heads), k.chunk(kv_heads), v.chunk(kv_heads)) for t in part])


def _head_norm(name: str, module: nn.Module | None, heads: int, head_dim: int, fam: _Family, eps: float) -> HeadNorm:
    """The norm of a layer's query or key heads (``heads`` of them), checked: one norm over
    head_dim shared by every head (or over the whole projection with head_norm_whole), one weight
    row per head (Cohere's), or a list of one norm per head (StableLM's)."""
    if module is None:
        raise FastPathUnsupported(f"{name} is missing")
    per_head = getattr(module, "norms", None)
    if isinstance(per_head, nn.ModuleList):
        if len(per_head) != heads or {n for n, _ in module.named_children()} != {"norms"} \
                or any(True for _ in module.named_parameters(recurse=False)):
            raise FastPathUnsupported(f"{name} is not one norm for each of its {heads} heads")
        for j, norm in enumerate(per_head):
            _norm_ok(f"{name} head {j}", norm, head_dim, fam.layer_norm, eps, fam.norm_eps)

        def rows(attr: str) -> torch.Tensor | None:
            tensors = [getattr(norm, attr, None) for norm in per_head]
            if any(t is None for t in tensors) != all(t is None for t in tensors):
                raise FastPathUnsupported(f"{name} has a {attr} in some heads' norms only")
            return None if tensors[0] is None else torch.stack(tensors)

        weight = rows("weight")
        return HeadNorm(torch.ones(heads, head_dim) if weight is None else weight, rows("bias"), each=True)
    weight = getattr(module, "weight", None)
    each = isinstance(weight, torch.Tensor) and weight.dim() == 2 and not fam.head_norm_whole
    width = heads * head_dim if fam.head_norm_whole else head_dim
    _norm_ok(name, module, width, fam.layer_norm, eps, fam.norm_eps, shape=(heads, head_dim) if each else None)
    return HeadNorm(torch.ones(width) if weight is None else weight,
                    getattr(module, "bias", None) if fam.layer_norm else None, each)


def _children_with_weights(module: nn.Module) -> set[str]:
    return {n for n, m in module.named_children()
            if any(True for _ in m.parameters()) or any(True for _ in m.buffers())}


def _mlp_modules(i: int, mlp: nn.Module, fam: _Family, h: int, f: int, shared: nn.Module | None = None):
    """A layer's MLP as (gate, up, down, None), or a mixture of experts as (None, None, None,
    :class:`Experts`) where the family has them and the layer's MLP is one (``shared``: the
    layer's own MLP beside it, _Family.shared_mlp)."""
    children = _children_with_weights(mlp)
    if fam.moe and {fam.router_name, "experts"} <= children:
        return None, None, None, _experts(i, mlp, children, fam, h, shared)
    if shared is not None:
        raise FastPathUnsupported(f"layer {i} has a {fam.shared_mlp} beside an MLP that is no mixture of experts")
    up_name, down_name = fam.plain_mlp or ("up_proj", "down_proj")
    names = ({up_name, down_name} if fam.plain_mlp else {"gate_up_proj", down_name} if fam.fused_mlp
             else {"gate_proj", up_name, down_name})
    if children != names:
        raise FastPathUnsupported(f"layer {i} MLP is not an MLP of {', '.join(sorted(names))} "
                                  f"(has {', '.join(sorted(children)) or 'nothing'})")
    if fam.fused_mlp:
        _linear_ok(f"layer {i} gate_up_proj", mlp.gate_up_proj, 2 * f, h)
        gate, up = RowSlice(mlp.gate_up_proj, 0, f), RowSlice(mlp.gate_up_proj, f, 2 * f)
    else:
        gate, up = None if fam.plain_mlp else mlp.gate_proj, getattr(mlp, up_name)
        for name, module in (("gate_proj", gate), (up_name, up)):
            if module is not None:
                _linear_ok(f"layer {i} {name}", module, f, h)
    down = getattr(mlp, down_name)
    _linear_ok(f"layer {i} {down_name}", down, h, f)
    return gate, up, down, None


def _experts(i: int, mlp: nn.Module, children: set[str], fam: _Family, h: int,
             layer_shared: nn.Module | None = None) -> Experts:
    """A mixture-of-experts block's router, 3-D expert weights and shared expert (its own, or the
    layer's ``layer_shared``), checked."""
    routed = {fam.router_name, "experts"}
    shared_name = "shared_experts" if "shared_experts" in children else "shared_expert"
    if children not in (routed, routed | {shared_name}, routed | {"shared_expert", "shared_expert_gate"}):
        raise FastPathUnsupported(f"layer {i} mixture of experts has {', '.join(sorted(children))}, not a router "
                                  "and experts (and a shared expert, with or without its gate)")
    router, experts = getattr(mlp, fam.router_name), mlp.experts
    weights = {n: p for n, p in experts.named_parameters()}
    gate_up, down = weights.get("gate_up_proj"), weights.get("down_proj")
    router_weight = getattr(router, "weight", None)
    buffers = {n for n, _ in router.named_buffers()}
    if buffers - ({"e_score_correction_bias"} if fam.router in _BIASED_ROUTERS else set()):
        raise FastPathUnsupported(f"layer {i} router holds {', '.join(sorted(buffers))}, which the native step does "
                                  "not read for this family")
    input_major, biased = bool(fam.input_major_experts), fam.input_major_experts == "alternating"
    names = ("gate_up_proj", "down_proj", *(("gate_up_proj_bias", "down_proj_bias") if biased else ()))
    if set(weights) != set(names) or {n for n, _ in router.named_parameters()} != ({"weight", "bias"} if biased
                                                                              else {"weight"}) \
            or any(t is None or t.dim() != d or t.dtype != torch.float32
                   for t, d in ((gate_up, 3), (down, 3), (router_weight, 2))):
        raise FastPathUnsupported(f"layer {i} experts are not fp32 {', '.join(names[:-1])} and {names[-1]} tensors "
                                  f"behind a router of {'a weight and bias' if biased else 'one weight'}")
    count, top_k = router_weight.shape[0], getattr(router, "top_k", None)
    width = gate_up.shape[2 if input_major else 1] // 2
    shapes = ((count, h, 2 * width), (count, width, h)) if input_major else ((count, 2 * width, h), (count, h, width))
    if tuple(router_weight.shape) != (count, h) or (tuple(gate_up.shape), tuple(down.shape)) != shapes \
            or not _is_count(top_k) or top_k > count:
        raise FastPathUnsupported(f"layer {i} experts' shapes ({list(router_weight.shape)}, {list(gate_up.shape)}, "
                                  f"{list(down.shape)}, top {top_k!r}) are not one router over gated experts")
    renormalize = fam.moe == "always" or bool(getattr(router, "norm_topk_prob", False))
    shared_modules = None
    if shared_name in children:  # Qwen 2 MoE's scaled by a sigmoid gate, Flint's and GLM 4 MoE's in full
        expert, scale = getattr(mlp, shared_name), getattr(mlp, "shared_expert_gate", None)
        if _children_with_weights(expert) != {"gate_proj", "up_proj", "down_proj"}:
            raise FastPathUnsupported(f"layer {i} shared expert is not a gated MLP")
        width_shared = int(getattr(expert.up_proj, "out_features", 0))
        for name, module, shape in (("gate_proj", expert.gate_proj, (width_shared, h)),
                                    ("up_proj", expert.up_proj, (width_shared, h)),
                                    ("down_proj", expert.down_proj, (h, width_shared)),
                                    ("shared_expert_gate", scale, (1, h))):
            if module is not None:
                _linear_ok(f"layer {i} shared {name}", module, *shape)
        if getattr(scale, "bias", None) is not None:
            raise FastPathUnsupported(f"layer {i} shared expert's gate has a bias")
        shared_modules = (expert.gate_proj, expert.up_proj, expert.down_proj, scale)
    if layer_shared is not None:
        if shared_modules is not None or _children_with_weights(layer_shared) != {"input_linear", "output_linear"}:
            raise FastPathUnsupported(f"layer {i} {fam.shared_mlp} is not a gated MLP of input_linear and "
                                      "output_linear beside a mixture without a shared expert")
        width_shared = int(getattr(layer_shared.output_linear, "in_features", 0))
        _linear_ok(f"layer {i} {fam.shared_mlp} input_linear", layer_shared.input_linear, 2 * width_shared, h)
        _linear_ok(f"layer {i} {fam.shared_mlp} output_linear", layer_shared.output_linear, h, width_shared)
        fused = layer_shared.input_linear  # the gate's rows, then the up projection's
        shared_modules = (RowSlice(fused, 0, width_shared), RowSlice(fused, width_shared, 2 * width_shared),
                          layer_shared.output_linear, None)
    grouped = _grouped_choice(i, mlp, router, count) if fam.router in _BIASED_ROUTERS else {}
    layout = _biased_experts(i, experts, router, count, width, h) if biased else {}
    return Experts(router_weight, gate_up, down, top_k, renormalize, fam.router != "softmax", shared_modules,
                   **grouped, **layout, input_major=input_major, choose_by_logit=fam.router == "logit_choice")


def _biased_experts(i: int, experts: nn.Module, router: nn.Module, count: int, width: int, h: int) -> dict:
    """gpt-oss's expert biases and clamped SwiGLU (``Experts`` fields), checked."""
    gate_up_bias, down_bias, router_bias = experts.gate_up_proj_bias, experts.down_proj_bias, router.bias
    alpha, limit = getattr(experts, "alpha", None), getattr(experts, "limit", None)
    if (tuple(gate_up_bias.shape), tuple(down_bias.shape), tuple(router_bias.shape)) != ((count, 2 * width),
                                                                                         (count, h), (count,)) \
            or any(t.dtype != torch.float32 for t in (gate_up_bias, down_bias, router_bias)) \
            or not (_is_finite(alpha) and _is_finite(limit) and limit > 0):
        raise FastPathUnsupported(f"layer {i} experts' biases or SwiGLU (alpha {alpha!r}, limit {limit!r}) are not "
                                  "the native step's")
    return dict(alternate=True, gate_up_bias=gate_up_bias, down_bias=down_bias, router_bias=router_bias,
                swiglu_alpha=float(alpha), swiglu_limit=float(limit))


def _grouped_choice(i: int, block: nn.Module, router: nn.Module, count: int) -> dict:
    """DeepSeek-V3's choice of experts (``Experts`` fields) as the router holds it, or its block
    holds the bias (MiniMax M2, HY 3); no groups and a scale of 1 where the router names none."""
    bias = getattr(router, "e_score_correction_bias", getattr(block, "e_score_correction_bias", None))
    groups, top_groups = getattr(router, "num_group", 1), getattr(router, "topk_group", 1)
    scale = getattr(router, "routed_scaling_factor", getattr(router, "router_scaling_factor", 1.0))
    if not isinstance(bias, torch.Tensor) or bias.shape != (count,) or bias.dtype != torch.float32 \
            or not (_is_count(groups) and _is_count(top_groups)) or count % groups or top_groups > groups \
            or not _is_finite(scale):
        raise FastPathUnsupported(f"layer {i} router's grouped choice (bias, {groups!r} groups, top {top_groups!r}, "
                                  f"scale {scale!r}) is not one the native step reads")
    return dict(choice_bias=bias, groups=groups, top_groups=top_groups, routed_scale=float(scale))


def _windows(config, fam: _Family, num_layers: int) -> list[int]:
    """Each layer's sliding window (0: it attends over every earlier position)."""
    types = list(getattr(config, "layer_types", None) or ())
    if set(types) - set(_LAYER_TYPES) or getattr(config, "use_bidirectional_attention", False):
        raise FastPathUnsupported(f"layer types {sorted(set(types))} are not covered by the native step")
    if types and len(types) != num_layers:
        raise FastPathUnsupported(f"the config lists {len(types)} layer types for {num_layers} layers")
    if fam.all_slide:  # the forward slides every layer when a window is set, whatever layer_types say
        slides = [bool(getattr(config, "sliding_window", None))] * num_layers
    else:
        slides = [t == "sliding_attention" for t in types] or [False] * num_layers
    window = getattr(config, "sliding_window", None) if any(slides) else 0
    if isinstance(window, bool) or not isinstance(window, int) or window < 0 or (any(slides) and not window):
        raise FastPathUnsupported(f"sliding_window {window!r} is not a positive number of positions")
    return [window if slide else 0 for slide in slides]


def _rope_tables(config, fam: _Family, types: list[str], num_layers: int) -> tuple[tuple[str | None, ...], list[int]]:
    """The rotary tables the layers use (``DecoderDescription.rope_types``) and each layer's index."""
    if fam.rope_per_type:
        kinds = tuple(sorted(set(types)))
        return kinds, [kinds.index(t) for t in types]
    if fam.nope == "no_rope_layers":
        flags = getattr(config, "no_rope_layers", None)
        if not isinstance(flags, (list, tuple)) or len(flags) != num_layers or set(flags) - {0, 1}:
            raise FastPathUnsupported(f"no_rope_layers {flags!r} is not one 0 or 1 per layer")
    elif fam.position_embedding or fam.alibi:
        flags = [0] * num_layers
    elif fam.nope == "global" and getattr(config, "sliding_window", None):
        flags = [int(t == "sliding_attention") for t in types] or [0] * num_layers
    else:
        flags = [1] * num_layers
    kinds = tuple(kind for kind, used in ((None, 1 in flags), (NO_ROPE, 0 in flags)) if used)
    return kinds, [kinds.index(None if flag else NO_ROPE) for flag in flags]


def _llama4_query_scale(config) -> dict:
    """Ministral 3's query scale by position, from its rotary parameters (none without a beta)."""
    params = getattr(config, "rope_parameters", None) or {}
    beta, period = params.get("llama_4_scaling_beta"), params.get("original_max_position_embeddings")
    if beta is None:
        return {}
    if not _is_finite(beta) or not _is_count(period):
        raise FastPathUnsupported(f"llama_4_scaling_beta {beta!r} over original_max_position_embeddings {period!r} "
                                  "is not a finite scale over a positive period")
    return dict(q_pos_beta=float(beta), q_pos_period=period)


def _intermediate(config, hidden: int) -> int:
    """The MLP's width: intermediate_size, OPT's ffn_dim, GPT-2's n_inner or Falcon's
    ffn_hidden_size (four times hidden where the config names none)."""
    names = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")
    width = next((w for w in (getattr(config, n, None) for n in names) if w), 4 * hidden)
    if not _is_count(width):
        raise FastPathUnsupported(f"the MLP width {width!r} is not a positive number")
    return int(width)


def _is_count(value) -> bool:
    """An int (not a bool) of at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_finite(value) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < float("inf")


def _config_value(config, path: str):
    """A config field by dotted path (MPT's attn_config.clip_qkv, its sub-config an object or a
    dict); None where any part is missing."""
    value = config
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
    return value


def _positive(config, name: str) -> float:
    value = _config_value(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise FastPathUnsupported(f"{name} {value!r} is not a positive number")
    return float(value)


def _softcap(config, name: str, fam: _Family) -> float:
    if getattr(config, name, None) is None:
        return 0.0
    if not fam.softcaps:
        raise FastPathUnsupported(f"{name} is not covered by the native step for this family")
    return _positive(config, name)


def describe(model: nn.Module, first: int = 0, last: int | None = None) -> DecoderDescription:
    """Describe ``model``'s decoder for the native step, checking layers ``first..last-1``
    (default: all). :class:`FastPathUnsupported` with the reason when it is not covered."""
    config = text_config(model.config)
    family = getattr(model.config, "model_type", None)
    fam = _FAMILIES.get(family)
    if fam is None:
        raise FastPathUnsupported(f"model family {family!r} is not checked against the native step "
                                  f"(covered: {', '.join(FAST_FAMILIES)})")
    embedding = model.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    dtype = weight.dtype if isinstance(weight, torch.Tensor) else getattr(getattr(embedding, "scale", None), "dtype", None)
    if dtype != torch.float32:
        raise FastPathUnsupported(f"the native step computes in float32; the model runs in {dtype}")
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    if any(device.type != "cpu" for device in devices):
        raise FastPathUnsupported(f"the native step runs on the CPU; the model is on {sorted(map(str, devices))}")
    act = fam.activation or getattr(config, fam.act_field, None)
    if act not in _ACTIVATIONS:
        raise FastPathUnsupported(f"the MLP activation is {act!r}; the native step has {', '.join(_ACTIVATIONS)}")
    if fam.input_major_experts == "halves" and act != "silu":  # Aria's routed experts are SiLU-gated whatever it says
        raise FastPathUnsupported(f"the routed experts' activation is silu, the shared experts' {act}")
    layers = decoder_layers(model)
    windows = _windows(config, fam, len(layers))
    attn_softcap, logit_softcap = (_softcap(config, name, fam)
                                   for name in ("attn_logit_softcapping", "final_logit_softcapping"))
    types = list(getattr(config, "layer_types", None) or ())
    rope_types, ropes = _rope_tables(config, fam, types, len(layers))
    params = getattr(config, "rope_parameters", None) or {}
    rope_switch = 0
    for rope in ([str((params.get(t) or {}).get("rope_type", "default")) for t in rope_types] if fam.rope_per_type
                 else [_rope_type(config)] if rope_types != (NO_ROPE,) else []):
        if rope == _SWITCHED_ROPE and not fam.rope_per_type:
            rope_switch = params.get("original_max_position_embeddings")
            if not _is_count(rope_switch):
                raise FastPathUnsupported(f"longrope's original_max_position_embeddings {rope_switch!r} is not a "
                                          "positive number of positions")
        elif rope not in _STATIC_ROPE:
            raise FastPathUnsupported(f"rotary type {rope!r} depends on the sequence length; the native step "
                                      f"covers {', '.join(_STATIC_ROPE)} and {_SWITCHED_ROPE}")
    hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
    repeats = 1
    if fam.broadcast_kv and getattr(config, fam.broadcast_kv, False):
        kv_heads = getattr(config, "num_kv_heads", None)
        if not _is_count(kv_heads) or heads % kv_heads:
            raise FastPathUnsupported(f"num_kv_heads {kv_heads!r} does not divide {heads} query heads")
        repeats = heads // kv_heads
    elif fam.multi_query:
        kv_heads = 1 if getattr(config, "multi_query", False) else heads
    else:
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    if heads % kv_heads or head_dim % 2:
        raise FastPathUnsupported(f"{heads} query heads over {kv_heads} key/value heads of width {head_dim} "
                                  "are not a grouped-query layout of even head width")
    scale = float(config.query_pre_attn_scalar) ** -0.5 if fam.pre_attn_scalar else head_dim ** -0.5
    if fam.scale_field and _config_value(config, fam.scale_field) is not None:
        scale = _positive(config, fam.scale_field)
    multipliers = {}
    if fam.multipliers:
        scale = _positive(config, "attention_multiplier")
        logits = "logit_divisor" if fam.multipliers == "divide" else "logit_multiplier"
        multipliers = dict(residual_scale=_positive(config, "residual_multiplier"),
                           embed_scale=_positive(config, "embedding_multiplier"),
                           **{logits: _positive(config, "logits_scaling")})
    if fam.llama4_query_scale:
        multipliers.update(_llama4_query_scale(config))
    if fam.logit_scale:
        multipliers.update(logit_multiplier=_positive(config, "logit_scale"))
    if fam.clip_qkv and _config_value(config, fam.clip_qkv) is not None:
        multipliers.update(clip_qkv=_positive(config, fam.clip_qkv))
    parallel, head_norms = (flag == "always" or bool(flag and getattr(config, flag, False))
                            for flag in (fam.parallel, fam.head_norms))
    d = dict(hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
             intermediate=_intermediate(config, hidden), attn_scale=scale)
    last = len(layers) if last is None else last

    def layer(i: int) -> LayerModules | None:
        if not (first <= i < last and isinstance(layers[i], nn.Module) and not isinstance(layers[i], nn.Identity)):
            return None
        described = _layer_modules(i, layers[i], d, fam, windows[i], ropes[i], parallel, head_norms)
        # Families that keep the choice per layer.
        use_rope = getattr(getattr(layers[i], fam.attn_name), "use_rope", None)
        if use_rope is not None and bool(use_rope) != (rope_types[ropes[i]] != NO_ROPE):
            raise FastPathUnsupported(f"layer {i} attention's use_rope is {use_rope!r}, the config says otherwise")
        return described

    described = tuple(layer(i) for i in range(len(layers)))
    path = find_decoder_layers(model)[0]
    base = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    rotary = getattr(base, "rotary_emb", None)
    if rope_switch and rotary is not None:  # it sets its own frequencies each call: a private copy
        rotary = copy.deepcopy(rotary)  # cannot race the model's forward on another thread
    if fam.rope_once and rotary is not None:
        rotary = _AnglesTwiceOver(rotary, fam.rope_once == "sin, cos")
    present = [n for n in fam.absent if getattr(base, n, None) is not None]
    unset = [n for n in fam.requires if not getattr(config, n, False)]
    present += [n for n in fam.forbids if getattr(config, n, False)]
    if present or unset:
        raise FastPathUnsupported(f"the native step has no {', '.join(present)}" if present else
                                  f"the native step needs {', '.join(unset)}")
    norm = getattr(base, fam.final_norm, None)
    head = model.get_output_embeddings()
    if (rotary is None and rope_types != (NO_ROPE,)) or norm is None or head is None:
        raise FastPathUnsupported("the model has no rotary_emb, final norm or LM head where the native step looks")
    embedding = getattr(base, fam.position_embedding, None) if fam.position_embedding else None
    offset = getattr(embedding, "offset", 0)  # OPT's and XGLM's rows start at 2
    positions = getattr(embedding, "weight", getattr(embedding, "weights", None))  # learned, or XGLM's sinusoids
    if fam.position_embedding and not (isinstance(positions, torch.Tensor) and positions.dtype == torch.float32
                                       and positions.dim() == 2 and positions.shape[1] == hidden
                                       and _is_count(offset + 1)):
        raise FastPathUnsupported(f"the position embedding {fam.position_embedding} is not an fp32 table "
                                  f"of width {hidden}")
    _norm_ok("final norm", norm, hidden, fam.layer_norm, fixed_eps=fam.norm_eps)
    embed_norm = getattr(base, fam.embed_norm, None) if fam.embed_norm else None
    if fam.embed_norm:
        _norm_ok(f"the embeddings' {fam.embed_norm}", embed_norm, hidden, fam.layer_norm)
    return DecoderDescription(**d, layers=described, rotary=rotary, final_norm=norm, lm_head=head,
                              act=_ACTIVATIONS[act], norm_offset=fam.norm_offset, rope_types=rope_types,
                              attn_softcap=attn_softcap, logit_softcap=logit_softcap,
                              rope_interleaved=fam.rope_interleaved,
                              rotary_dim=_rotary_dim(rotary, rope_types, head_dim), layer_norm=fam.layer_norm,
                              final_eps=norm_eps(norm, fam.norm_eps), parallel=parallel,
                              gated=fam.plain_mlp is None, rope_table_repeated=fam.rope_table_repeated,
                              rope_switch=rope_switch, positions=positions, position_offset=offset,
                              alibi=_alibi_slopes(base, fam, heads), embed_norm=embed_norm, cache_repeats=repeats,
                              **multipliers)


def _alibi_slopes(base: nn.Module, fam: _Family, heads: int) -> torch.Tensor | None:
    """Each head's ALiBi slope from the biases the decoder's own method builds for three
    positions, checked to be a slope times the position (None: no ALiBi)."""
    if not fam.alibi:
        return None
    build = getattr(base, fam.alibi, None)
    if build is None:
        raise FastPathUnsupported(f"the decoder has no {fam.alibi}")
    with torch.inference_mode():
        if fam.alibi == "build_alibi_tensor":  # Bloom's, from an attention mask
            biases = build(torch.ones(1, 3, dtype=torch.long), heads, torch.float32)
        else:  # MPT's, for a sequence length
            biases = build(heads, 3)
    biases = biases.float().reshape(heads, 3)
    slopes = biases[:, 1] - biases[:, 0]
    if not torch.allclose(biases[:, 2] - biases[:, 1], slopes, rtol=1e-6, atol=0) or not slopes.isfinite().all():
        raise FastPathUnsupported(f"{fam.alibi}'s biases are not a slope per head times the position")
    return slopes.contiguous()


class _AnglesTwiceOver(nn.Module):
    """A rotary module that returns one value per angle (gpt-oss's; GPT-J's, sin first) as the
    others return theirs: (cos, sin), each angle's twice over."""

    def __init__(self, rotary: nn.Module, sin_first: bool) -> None:
        super().__init__()
        self.rotary, self.sin_first = rotary, sin_first

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(x, position_ids)[::-1 if self.sin_first else 1]
        return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


def rotary_table(rotary: nn.Module, kind: str | None, positions: torch.Tensor,
                 head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[1, positions, width]`` of one rotary table from the model's own module (kind:
    ``DecoderDescription.rope_types``' entry, a layer type or None for the module's only one)."""
    probe = torch.zeros(1, 1, head_dim, dtype=torch.float32)  # the module reads its dtype and device
    with torch.inference_mode():
        return rotary(probe, positions) if kind is None else rotary(probe, positions, kind)


def _rotary_dim(rotary: nn.Module, rope_types: tuple[str | None, ...], head_dim: int) -> int:
    """How many of each head's values the rotary tables turn (partial rotary: GLM's half), read
    from the tables the model's module makes; one even width for every table."""
    widths = {rotary_table(rotary, kind, torch.zeros(1, 1, dtype=torch.long), head_dim)[0].shape[-1]
              for kind in rope_types if kind != NO_ROPE} or {head_dim}
    if len(widths) != 1 or not 0 < min(widths) <= head_dim or min(widths) % 2:
        raise FastPathUnsupported(f"the rotary tables are {sorted(widths)} wide, not one even width up to "
                                  f"head_dim = {head_dim}")
    return widths.pop()
