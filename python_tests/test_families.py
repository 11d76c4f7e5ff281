"""Every causal-LM family transformers lists (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), built from
a tiny random config: split generation through the lossless codec equals ``model.generate()``
token for token at the first, a middle and the last split, greedy and seeded sampling; OPSC
and the planner accept the model.

The families come from transformers itself, not from a list here. A family is skipped, with
the reason, when it is not a decoder-only causal LM, when it cannot be built at test size, or
when its own ``generate()`` fails there; run ``pytest -rs`` to see them.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from splitkernels.codec import CodecConfigV2, decode, encode, from_bytes
from splitkernels.codec.predict import table_for
from splitkernels.codec.spec import config_for_model
from splitkernels.models import ModelShape, UnsupportedModel, adapter_for, decoder_layers
from splitkernels.models.tiny import tiny_config
from splitkernels.nn import QuantConfig
from splitkernels.planner.costs import memory
from splitkernels.runtime import SplitConfig, split_model

NUM_LAYERS = 4
VOCAB = 128
NEW_TOKENS = 4
CALIBRATION_WINDOW = 32
MAX_PARAMS = 10_000_000  # a family still this large at test size has sizes no config field sets
SEED = 7
TEMPERATURE = 1.5

FAMILIES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())
# Families the generic split path does not run yet, and why (strict: a fix makes the test fail
# until the entry goes).
KNOWN_LIMITS = {
    "minimax": "its forward refuses a DynamicCache: it needs a cache class of its own (a family adapter)",
    "hy_v4": "its layers pass more than the hidden state from one to the next (a family adapter)",
    "lfm3": "hybrid convolution/attention: the split after layer 2 differs from generate (not yet understood)",
    "deepseek_v4": "hyper-connections: its layers pass several residual streams, not one hidden state (a family "
                   "adapter that sends the streams across the split)",
    "glm_moe_dsa": "its sparse-attention indexer reads state the skipped layers would have left in the cache "
                   "(a family adapter)",
}


def _reason(what: str, exc: Exception) -> str:
    return f"{what}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def _hf(model, ids: torch.Tensor, sample: bool) -> torch.Tensor:
    kwargs = dict(do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, pad_token_id=0,
                              eos_token_id=None, **kwargs)


@torch.inference_mode()
def _own_greedy(model, ids: torch.Tensor) -> torch.Tensor:
    """Greedy tokens from the model's own uncached forward, one full pass per token."""
    for _ in range(NEW_TOKENS):
        ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def _build(model_type: str, class_name: str):
    """The tiny model of ``model_type``, or a skip that says why it cannot be one."""
    try:
        config = tiny_config(model_type, num_layers=NUM_LAYERS, hidden=64, vocab=VOCAB)
    except Exception as exc:  # noqa: BLE001 -- any refusal of the family's own config validation
        pytest.skip(_reason("the config cannot be shrunk to test size", exc))
    if getattr(config, "is_encoder_decoder", False):
        pytest.skip("encoder-decoder model, not decoder-only")
    if getattr(config, "is_decoder", True) is False:
        pytest.skip("bidirectional encoder (is_decoder=False), not a causal LM")
    cls = getattr(transformers, class_name)
    try:
        with torch.device("meta"):
            params = sum(p.numel() for p in cls(config).parameters())
    except Exception as exc:  # noqa: BLE001
        pytest.skip(_reason("cannot be instantiated from a tiny config", exc))
    if params > MAX_PARAMS:
        pytest.skip(f"{params} parameters at test size: sizes that are not config fields")
    torch.manual_seed(0)
    model = cls(config).eval()
    model.generation_config.eos_token_id = None
    return model


def _runnable(model_type: str, class_name: str, ids: torch.Tensor):
    """The tiny model of ``model_type`` with its own greedy and sampled ``generate()`` of ``ids``, or
    a skip that says why the family cannot be checked."""
    model = _build(model_type, class_name)
    try:
        greedy, sampled = _hf(model, ids, False), _hf(model, ids, True)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(_reason("model.generate() itself fails at test size", exc))
    return model, greedy, sampled


def _check_adapter(model) -> None:
    try:
        adapter_for(model)
    except UnsupportedModel as exc:
        pytest.skip(_reason("not a model the split can run", exc))


@pytest.mark.parametrize("model_type, class_name", FAMILIES, ids=[t for t, _ in FAMILIES])
def test_family_split_equals_generate(model_type, class_name, request):
    ids = torch.randint(3, VOCAB - 1, (1, 6), generator=torch.Generator().manual_seed(1))
    model, greedy, sampled = _runnable(model_type, class_name, ids)
    if model_type in KNOWN_LIMITS:
        request.applymarker(pytest.mark.xfail(reason=KNOWN_LIMITS[model_type], strict=True))
    _check_adapter(model)
    layers = len(decoder_layers(model))
    splits = sorted({1, layers // 2, layers - 1})
    for split in splits:
        sm = split_model(model, SplitConfig(split))
        got = sm.generate(ids, NEW_TOKENS)
        if split == 1 and not torch.equal(got, greedy) and not torch.equal(greedy, _own_greedy(model, ids)):
            pytest.skip("model.generate() disagrees with the model's own forward (it passes position ids the "
                        "forward would not use by itself); the split follows the forward")
        assert torch.equal(got, greedy), f"greedy, split {split}"
        got = sm.generate(ids, NEW_TOKENS, do_sample=True, temperature=TEMPERATURE, seed=SEED)
        assert torch.equal(got, sampled), f"sampling, split {split}"
        sm.close()

    # OPSC: both halves quantised in place; the split still equals the (quantised) model's generate.
    middle = splits[len(splits) // 2]
    front, back = QuantConfig(4, 32), QuantConfig(8, 32)
    quantised = copy.deepcopy(model)
    try:
        sm = split_model(quantised, SplitConfig(middle, front=front, back=back))
    except AttributeError as exc:
        if "QuantLinear" not in str(exc):
            raise
        pytest.xfail(_reason("OPSC: the family's layers read an nn.Linear's .weight directly, "
                             "which a quantised QuantLinear does not have", exc))
    assert torch.equal(sm.generate(ids, NEW_TOKENS), _hf(quantised, ids, False))
    sm.close()

    # Planner: the shape read from the modules equals the one built from the config alone.
    shape = ModelShape.from_model(model, dtype_bytes=4)
    assert shape == ModelShape.from_config(model.config, dtype_bytes=4)
    mem = memory(shape, middle, front, back, max_seq_len=64)
    assert mem.edge_weights > 0 and mem.server_weights > 0 and shape.num_layers == layers


@pytest.mark.parametrize("model_type, class_name", FAMILIES, ids=[t for t, _ in FAMILIES])
def test_family_codec_v2_calibrates_and_generates(model_type, class_name):
    """Codec v2 as the CLI calibrates it (diagonal Fisher, KL measured through the model, the token
    prediction offered) at the middle split of every family: every coded value of a fresh prompt's
    split hidden state lies within half its step, and greedy split generation through the v2
    frames picks the tokens the teacher-forced split model (each token's frame on its own, no
    cache) ranks first."""
    ids = torch.randint(3, VOCAB - 1, (1, 6), generator=torch.Generator().manual_seed(1))
    model, greedy, _ = _runnable(model_type, class_name, ids)
    if model_type in KNOWN_LIMITS:
        pytest.skip(f"the split itself does not run yet (test_family_split_equals_generate): {KNOWN_LIMITS[model_type]}")
    _check_adapter(model)
    split = max(1, len(decoder_layers(model)) // 2)
    gen = torch.Generator().manual_seed(2)
    windows = [torch.randint(3, VOCAB - 1, (CALIBRATION_WINDOW,), generator=gen) for _ in range(2)]
    config = config_for_model({"kind": "v2", "sensitivity": "fisher"}, model, split, windows, window=CALIBRATION_WINDOW)
    assert isinstance(config, CodecConfigV2) and config.info["scales"] == "fisher"

    # Every frame at the calibrated step, as the teacher-forced pass below codes them (rate control
    # would pick other steps for the generation's frames: test_codec_v2_rate.py).
    sm = split_model(model, SplitConfig(split, codec=config, rate_control=False))
    prompt = torch.randint(3, VOCAB - 1, (1, 12), generator=gen)
    hidden = sm.edge.forward(prompt, None, 0)  # [T, d] fp32: the tiny models send their own dtype
    table = table_for(config.prediction, model)
    enc = encode(hidden, config, start=0, tokens=prompt[0], embedding=table)
    back = decode(from_bytes(enc.to_bytes(), config=config), embedding=table).float()
    coded = (enc.symbols != config.escape_symbol) & ~enc.raw[:, None]
    bound = torch.tensor(config.step_array()) / 2 * (1 + 1e-3) + hidden.float().abs() * 2.0 ** -10
    assert ((back - hidden.float()).abs() <= bound)[coded].all()
    if config.prediction is None:  # escapes and raw tokens travel exactly
        assert torch.equal(back[~coded], hidden.float()[~coded])
    else:  # they carry the residual exactly, and adding the prediction back rounds in fp32
        pred = config.prediction.values(prompt[0], table, hidden.device)
        assert ((back - hidden).abs() <= (hidden.abs() + pred.abs()) * 2.0 ** -22)[~coded].all()

    result = sm.run(ids, NEW_TOKENS)
    forced = sm(result.sequences[:, :-1])[0, ids.shape[1] - 1:]
    picked = forced.gather(1, torch.tensor(result.new_tokens)[:, None])[:, 0]
    # The cached and the uncached forward may round differently, so a near-tie may go either way:
    # each picked token is the teacher-forced argmax up to 1e-4 of the logits' scale.
    ranked_first = bool((picked >= forced.max(-1).values - 1e-4 * forced.abs().max()).all())
    sm.close()
    if not ranked_first and not torch.equal(greedy, _own_greedy(model, ids)):
        pytest.skip("model.generate() disagrees with the model's own uncached forward, which the teacher-forced check runs")
    assert ranked_first, (forced.argmax(-1).tolist(), result.new_tokens)
