"""Helpers shared by the runtime tests: seeded prompts, bounded polling and free ports (the
benchmarks' own helper, bench/loopback.py)."""
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from loopback import free_ports  # noqa: E402,F401  (re-exported for the runtime tests)


def prompt(seed: int, length: int, vocab: int = 256) -> torch.Tensor:
    """Token ids ``[1, length]`` drawn from ``[0, vocab - 1)`` with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 1, (1, length), generator=g)


def wait_for(predicate, timeout_s: float = 20.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout_s`` passes (the server frees sessions
    asynchronously); its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def sliding_window_models(num_layers: int = 4, window: int = 5) -> list:
    """A Mistral whose every layer slides over ``window`` positions and a Qwen2 whose layers after
    the second slide while the first two attend to everything (hybrid), tiny and seeded."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(15)
    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128)
    return [MistralForCausalLM(MistralConfig(**common, sliding_window=window)).eval(),
            Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, sliding_window=window,
                                         max_window_layers=2)).eval()]


def family_model(model_type: str, window: int = 5, **overrides) -> torch.nn.Module:
    """A tiny model of any family from its own config (``models.tiny``), norms' weights and biases
    and gpt-oss's expert biases random (Gemma's zero-initialised norms would hide the 1 + w,
    LayerNorms' zero biases theirs), sliding layers' windows shrunk to ``window``, soft caps shrunk
    to ``TINY_SOFTCAP``, and Granite's (and its MoE's) and HyperCLOVA X's multipliers, Ministral
    3's query scale, OLMo's and MPT's clamp of q, k and v, gpt-oss's clamped SwiGLU, OLMo 3's
    rotary of full-attention layers, Qwen 3 MoE's renormalised top k and DeepSeek-V3-style
    routers' groups, bias and scale made to count (the native step's tests); then the config
    fields ``overrides`` names."""
    from transformers import AutoModelForCausalLM

    from splitkernels.models.loading import TINY_SOFTCAP
    from splitkernels.models.tiny import tiny_config

    config = tiny_config(model_type, num_layers=4, hidden=64, vocab=128)
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()) or model_type in ("phi3", "starcoder2"):
        config.sliding_window = window
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, cap, None) is not None:  # tiny scores and logits never reach 30 or 50
            setattr(config, cap, TINY_SOFTCAP)
    if model_type in ("granite", "granitemoe", "hyperclovax"):  # multipliers of 1 would hide them
        config.attention_multiplier, config.residual_multiplier = 0.3, 0.5
        config.embedding_multiplier, config.logits_scaling = 2.0, 3.0
    if model_type == "qwen3_moe":  # as Qwen 3's MoE models set it (Qwen 2's tiny config keeps False)
        config.norm_topk_prob = True
    if getattr(config, "n_group", None) is not None:  # DeepSeek-V3's choice: two groups, one kept, scaled
        config.n_group, config.topk_group, config.routed_scaling_factor = 2, 1, 2.5
    if model_type == "olmo":  # tiny projections stay below any clamp a real model sets
        config.clip_qkv = 0.1
    if model_type == "mpt":  # the same clamp, in its attention config
        config.attn_config.clip_qkv = 0.1
    if model_type == "gpt_oss":  # tiny gates and ups stay below the SwiGLU's limit of 7
        config.swiglu_limit = 0.05
    if model_type == "olmo3":  # both layer types' tables are the same in the tiny config
        config.rope_parameters = {**config.rope_parameters, "full_attention": {
            "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64}}
    if model_type == "ministral3":  # the query scale from position 3 on, not past 16384
        config.rope_parameters = {**config.rope_parameters, "llama_4_scaling_beta": 0.8,
                                  "original_max_position_embeddings": 3}
    for name, value in overrides.items():
        setattr(config, name, value)
    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"norms?(\.\d+)?\.(weight|bias)$", name):  # StableLM's per-head norms.0.weight too
                p.normal_(0.0, 0.3)
            if name.endswith("_proj_bias"):  # gpt-oss's 3-D experts' biases, initialised to zeros
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zeros would hide the choice's bias
                b.normal_(0.0, 0.1)
    return model
