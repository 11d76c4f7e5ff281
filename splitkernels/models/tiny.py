"""Tiny random configs for any transformers causal-LM family: the family's own config class with
its sizes shrunk, so tests can build every family in milliseconds and without a hub."""
from __future__ import annotations

from typing import Any

# Config fields by meaning (names differ between families); each present field is set.
_WIDTH = ("hidden_size", "n_embd", "d_model", "embed_dim", "model_dim")
_FFN = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff", "inner_hidden_size")
_EXPERT_FFN = ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
               "moe_shared_expert_intermediate_size", "shared_intermediate_size")
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_HEADS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "n_kv_heads")
_POSITIONS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")
_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_K = ("num_experts_per_tok", "moe_topk", "num_selected_experts", "moe_k")
_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id",
           "cls_token_id", "mask_token_id", "unk_token_id")
# Per-layer lists and patterns that must be as long as the model is deep.
_PER_LAYER_LISTS = ("layer_types", "layers_block_type", "block_types", "attn_type_list", "layer_block_types")


def _shrunk_per_layer(value: list, num_layers: int) -> list:
    """A per-layer list of ``num_layers`` entries that keeps every kind the original mixes,
    alternating them in order of first appearance (so a 4-layer model is still hybrid)."""
    kinds = list(dict.fromkeys(value))
    return [kinds[i % len(kinds)] for i in range(num_layers)]


def tiny_overrides(defaults: dict[str, Any], num_layers: int = 4, hidden: int = 64, vocab: int = 128,
                   heads: int = 4, positions: int = 256) -> dict[str, Any]:
    """Config keyword arguments that shrink a family's default config (``defaults``, its
    ``to_dict()``) to ``num_layers`` layers of width ``hidden`` over ``vocab`` tokens and
    ``positions`` positions."""
    out: dict[str, Any] = {}

    def put(names, value):
        for name in names:
            if name in defaults and defaults[name] is not None and not isinstance(defaults[name], (list, dict)):
                out[name] = value

    head_dim = hidden // heads
    put(("vocab_size",), vocab)
    put(_WIDTH, hidden)
    put(_FFN, 2 * hidden)
    put(_EXPERT_FFN, hidden)
    put(_LAYERS, num_layers)
    put(_HEADS, heads)
    # Grouped-query attention, except with latent attention (MLA), whose keys and values are per head.
    put(_KV_HEADS, heads if "kv_lora_rank" in defaults else heads // 2)
    put(("head_dim", "attention_head_size", "kv_channels"), head_dim)
    put(_POSITIONS, positions)
    put(_EXPERTS, 4)
    put(_TOP_K, 2)
    put(("n_shared_experts", "num_shared_experts"), 1)
    put(("first_k_dense_replace",), 1)
    put(("n_group", "topk_group"), 1)
    # Multi-head latent attention (DeepSeek-style) and other sub-head sizes.
    put(("kv_lora_rank", "q_lora_rank"), 2 * head_dim)
    put(("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "rotary_dim", "rotary_emb_base_dim"), head_dim)
    # Sliding windows shorter than a test prompt, so that masks are exercised.
    put(("sliding_window", "attention_window_size", "attention_chunk_size"), 6)
    # State-space and linear-attention blocks.
    put(("state_size", "mamba_d_state", "ssm_state_size", "d_state"), 8)
    put(("mamba_n_heads", "linear_num_value_heads", "linear_num_key_heads"), heads)
    put(("mamba_expand", "expand"), 2)
    put(("mamba_d_head", "mamba_head_dim"), 2 * hidden // heads)  # heads * head = expand * hidden
    put(("linear_key_head_dim", "linear_value_head_dim"), head_dim)
    put(("time_step_rank", "mamba_dt_rank"), 8)
    if "is_decoder" in defaults:  # encoder families used as causal LMs attend causally only as decoders
        out["is_decoder"] = True
    for name in _TOKENS:  # special tokens inside the small vocabulary
        if isinstance(defaults.get(name), int):
            out[name] = min(defaults[name], vocab - 1)
    for name in _PER_LAYER_LISTS:
        if isinstance(defaults.get(name), list) and defaults[name]:
            out[name] = _shrunk_per_layer(defaults[name], num_layers)
    return out


def tiny_config(model_type: str, num_layers: int = 4, hidden: int = 64, vocab: int = 128, heads: int = 4,
                positions: int = 256):
    """A random-init-ready config of ``model_type`` (any ``AutoConfig`` family) shrunk to test size."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type).to_dict()
    return AutoConfig.for_model(model_type, **tiny_overrides(defaults, num_layers, hidden, vocab, heads, positions))
