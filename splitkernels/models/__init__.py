"""Everything that knows a model's layout: where the decoder layers are, how the model is cut
into an edge and a server half (one generic path for every Hugging Face decoder-only family),
which weights and KV bytes each half holds, the planner's :class:`ModelShape`, and loading
models (tiny random ones, the packaged real models SmolLM2, Gemma 3 and Qwen2.5-Coder, a local Hugging Face
folder or a GGUF file)."""
from .layout import cache_nbytes, decoder_layers, find_decoder_layers, text_config
from .loading import (
    FAMILIES, PACKAGED, SMOLLM2_FILE, SMOLLM2_INSTALL, SMOLLM2_PACKAGE, LoadedModel, PackagedModel, load_model,
    is_causal_lm_type, load_packaged, load_smollm2, packaged_available, smollm2_available, tiny_model,
)
from .shape import ModelShape
from .split import Adapter, UnsupportedModel, adapter_for, register_adapter, supported_families

__all__ = [
    "cache_nbytes", "decoder_layers", "find_decoder_layers", "text_config", "FAMILIES", "SMOLLM2_FILE",
    "SMOLLM2_INSTALL", "SMOLLM2_PACKAGE", "PACKAGED", "PackagedModel", "LoadedModel", "load_model", "load_packaged",
    "load_smollm2", "packaged_available", "smollm2_available",
    "tiny_model", "is_causal_lm_type", "ModelShape", "UnsupportedModel", "Adapter", "adapter_for", "register_adapter",
    "supported_families",
]
