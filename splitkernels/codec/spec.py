"""Codec specs: the small JSON form in which a plan or a command line names a codec, and the one
function that turns it into a codec configuration.

A spec is a dict with ``kind``:

* ``{"kind": "v2", "bits": 4.0, "sensitivity": "fisher" | "uniform"}``: codec v2, calibrated on
  split-layer hidden states at about ``bits`` bits per element (``sensitivity`` default
  ``"uniform"``; ``"fisher"`` needs the measured diagonal Fisher). Without ``bits``,
  :func:`~splitkernels.codec.calibrate`'s default: with the Fisher, the rate the layer's measured
  sensitivity asks for (a KL proxy target within a decode-frame ceiling; :func:`config_for_model`
  corrects the target by the KL it measures through the model), else 4.0. With the
  Fisher, early positions also get finer steps by their measured weight (position shifts).
  ``"predict"`` (default true): :func:`config_for_model` offers the calibration the model's input
  embedding table, and the config predicts each hidden state from its token's row where that
  pays (docs/FORMATS.md §5.2.1; both ends then need that table); false never predicts.
* ``{"kind": "v1", ...}``: codec v1; the other keys are :class:`CodecConfig` fields.
* ``{"kind": "passthrough"}``: lossless (raw fp16/bf16/fp32 values).

A calibrated configuration is stored (in a plan, for example) by :func:`config_to_dict`: a v1
:class:`CodecConfig` as its own dict, a :class:`CodecConfigV2` as ``{"kind": "v2", ...}`` with its
arrays and fingerprint; :func:`config_from_dict` reads either back.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .calibrate import calibrate
from .config import CodecConfig
from .config_v2 import CodecConfigV2

KINDS = ("v2", "v1", "passthrough")
SENSITIVITIES = ("uniform", "fisher")


def check_spec(spec: Any) -> dict:
    """Return ``spec`` as a dict after checking its shape; ValueError naming the bad key otherwise."""
    if not isinstance(spec, dict):
        raise ValueError(f"codec spec must be a dict with 'kind' in {list(KINDS)}, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"codec spec 'kind' must be one of {list(KINDS)}, got {kind!r}")
    if kind == "v2":
        extra = set(spec) - {"kind", "bits", "sensitivity", "predict"}
        if extra:
            raise ValueError(f"codec spec of kind 'v2' takes 'bits', 'sensitivity' and 'predict', not {sorted(extra)}")
        if not isinstance(spec.get("predict", True), bool):
            raise ValueError(f"codec spec 'predict' must be true or false, got {spec.get('predict')!r}")
        bits = spec.get("bits")
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 1.0 <= bits <= 16.0):
            raise ValueError(f"codec spec 'bits' must be a number in [1, 16], got {bits!r}")
        if spec.get("sensitivity", "uniform") not in SENSITIVITIES:
            raise ValueError(f"codec spec 'sensitivity' must be one of {list(SENSITIVITIES)}, "
                             f"got {spec.get('sensitivity')!r}")
    elif kind == "passthrough" and set(spec) != {"kind"}:
        raise ValueError(f"codec spec of kind 'passthrough' takes no other keys, got {sorted(set(spec) - {'kind'})}")
    return spec


def is_v2_spec(spec: Any) -> bool:
    """True for a v2 spec (``{"kind": "v2", ...}``) -- what a calibration table's v2 points name."""
    return isinstance(spec, dict) and spec.get("kind") == "v2" and "center" not in spec


def config_to_dict(config: CodecConfig | CodecConfigV2) -> dict:
    """The JSON form of a codec configuration (module docstring); :func:`config_from_dict` inverts it."""
    if isinstance(config, CodecConfigV2):
        return {"kind": "v2", **config.to_dict()}
    if isinstance(config, CodecConfig):
        return config.to_dict()
    raise TypeError(f"config must be a CodecConfig or a CodecConfigV2, got {type(config).__name__}")


def config_from_dict(d: Any) -> CodecConfig | CodecConfigV2:
    """A codec configuration from :func:`config_to_dict`'s form; ValueError naming what is wrong."""
    if not isinstance(d, dict):
        raise ValueError(f"codec must be a JSON object, got {type(d).__name__}")
    if d.get("kind") == "v2":
        try:
            return CodecConfigV2.from_dict({k: v for k, v in d.items() if k != "kind"})
        except (KeyError, TypeError) as exc:
            raise ValueError(f"codec v2 config is missing or has a bad field: {exc}") from None
    try:
        return CodecConfig.from_dict(d)
    except TypeError as exc:
        raise ValueError(f"codec: {exc}") from None


def needs_calibration(spec: dict) -> bool:
    """True when :func:`config_from_spec` needs hidden states (and, for fisher, a sensitivity)."""
    return check_spec(spec)["kind"] == "v2"


def config_from_spec(spec: dict, hidden: torch.Tensor | None = None, *, sensitivity: torch.Tensor | None = None,
                     position_sensitivity: torch.Tensor | None = None, wire_dtype: torch.dtype = torch.float16,
                     tokens: torch.Tensor | None = None, embedding: torch.Tensor | None = None,
                     token_sensitivity: torch.Tensor | None = None) -> CodecConfig | CodecConfigV2:
    """The codec configuration a spec names.

    ``hidden``: split-layer hidden states ``[N, d]`` of calibration text (required for ``v2``, which
    calibrates on them; keep that text disjoint from any evaluation text). ``sensitivity``: the
    diagonal Fisher ``[d]`` (:func:`splitkernels.codec.sensitivity.fisher_diagonal`), required for
    ``"sensitivity": "fisher"``; ``position_sensitivity`` its trace per position (position shifts,
    used with the Fisher only). ``wire_dtype``: the dtype the edge sends. ``tokens`` (the ids of
    ``hidden``'s rows) and ``embedding`` (the input embedding table): a token prediction where it
    pays, unless the spec says ``"predict": false``; ``token_sensitivity`` (the Fisher trace per
    token) then sets token shifts (with the Fisher only).
    """
    spec = check_spec(spec)
    kind = spec["kind"]
    if kind == "passthrough":
        return CodecConfig.passthrough()
    if kind == "v1":
        try:
            return CodecConfig.from_dict({k: v for k, v in spec.items() if k != "kind"})
        except TypeError as exc:  # an unknown key
            raise ValueError(f"codec spec of kind 'v1': {exc}") from None
    if hidden is None:
        raise ValueError("codec spec of kind 'v2' needs calibration hidden states (hidden=[N, d])")
    fisher = spec.get("sensitivity", "uniform") == "fisher"
    if fisher and sensitivity is None:
        raise ValueError("codec spec with 'sensitivity': 'fisher' needs the measured Fisher (sensitivity=[d])")
    bits = spec.get("bits")
    if not spec.get("predict", True):
        tokens = embedding = None
    return calibrate(hidden, bits=None if bits is None else float(bits), sensitivity=sensitivity if fisher else None,
                     position_sensitivity=position_sensitivity if fisher else None, wire_dtype=wire_dtype,
                     tokens=tokens, embedding=embedding, token_sensitivity=token_sensitivity if fisher else None)


def config_for_model(spec: dict, model: nn.Module, split_layer: int, ids: torch.Tensor | Sequence[torch.Tensor], *,
                     window: int = 512, wire_dtype: torch.dtype = torch.float16, measure_kl: bool = True) -> CodecConfig | CodecConfigV2:
    """:func:`config_from_spec` for ``model`` split after ``split_layer``, calibrated on the token ids
    ``ids`` ``[N]`` (cut into windows of at most ``window`` tokens; a last partial window is dropped
    when there is a full one), or on ready windows (a sequence of ``[T]`` id tensors, each starting
    a sequence, e.g. :func:`splitkernels.eval.calibration_text.calibration_windows`). Forward passes only for ``"uniform"``, forward and backward
    (diagonal Fisher) for ``"fisher"``. A ``"fisher"`` spec without ``bits`` aims at its KL target
    as measured through the model on the calibration windows (:func:`~splitkernels.codec.measured.calibrate_measured`,
    two more forward passes per window) unless ``measure_kl`` is False (then as estimated from the
    Fisher alone). The caller keeps ``ids`` disjoint from evaluation text."""
    from .measured import calibrate_measured
    from .predict import embedding_table
    from .sensitivity import fisher_diagonal, split_hidden_states

    if not needs_calibration(spec):
        return config_from_spec(spec)
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1)
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an int >= 2, got {window!r}")
        if ids.numel() < 2:
            raise ValueError(f"calibration needs at least 2 token ids, got {ids.numel()}")
        full = ids.numel() // window
        windows = list(ids[: full * window].reshape(full, window)) if full else [ids]
    else:
        windows = [w.reshape(-1) for w in ids]
        if not windows or any(w.numel() < 2 for w in windows):
            raise ValueError("calibration windows must be a non-empty sequence of token id tensors of at least 2 ids each")
    predict = spec.get("predict", True)

    def offered(hidden: torch.Tensor) -> dict:  # the prediction's inputs, where the table can predict
        table = embedding_table(model, hidden.shape[1]) if predict else None
        return {"tokens": None if table is None else torch.cat(windows), "embedding": table}

    was_training = model.training
    model.eval()
    try:
        if spec.get("sensitivity", "uniform") == "fisher":
            fisher = fisher_diagonal(model, windows, split_layer)
            if measure_kl and spec.get("bits") is None:
                return calibrate_measured(model, windows, split_layer, fisher, wire_dtype=wire_dtype, predict=predict)
            return config_from_spec(spec, fisher.hidden, sensitivity=fisher.channel, position_sensitivity=fisher.position,
                                    wire_dtype=wire_dtype, token_sensitivity=fisher.token, **offered(fisher.hidden))
        hidden = split_hidden_states(model, windows, split_layer)
        return config_from_spec(spec, hidden, wire_dtype=wire_dtype, **offered(hidden))
    finally:
        model.train(was_training)
