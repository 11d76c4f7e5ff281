"""Input files of the command line (plans, calibration tables, measured profiles), read and
checked against their schema before use: every error names the file and the field."""
from __future__ import annotations

import json
import math
from typing import Any

from ..codec.config import BIT_MODES, THRESHOLD_MODES
from ..codec.config_v2 import check_position_shift
from ..nn.config import METHODS
from ..ops import CODEC_BITS, WEIGHT_BITS
from .errors import InputFileError


def read_json(path: str, what: str) -> Any:
    """Parse the JSON file at ``path`` (``what`` says which flag named it)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise InputFileError(path, f"cannot read the {what}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InputFileError(path, f"the {what} is not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputFileError(path, f"the {what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")


def read_bytes(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise InputFileError(path, f"cannot read the {what}: {exc.strerror or exc}") from None


class _Checker:
    """Type and range checks on one decoded JSON document; errors carry the dotted field path."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, field: str, problem: str) -> InputFileError:
        return InputFileError(self.path, problem, field)

    def obj(self, value: Any, field: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(field, f"must be a JSON object, got {_kind(value)}")
        return value

    def get(self, d: dict, key: str, field: str, optional: bool = False) -> Any:
        name = f"{field}.{key}" if field else key
        if key not in d:
            if optional:
                return None
            raise self.fail(name, "is missing")
        return d[key]

    def integer(self, d: dict, key: str, field: str = "", low: int | None = None, high: int | None = None,
                optional: bool = False, choices: tuple[int, ...] | None = None) -> int | None:
        name = f"{field}.{key}" if field else key
        v = self.get(d, key, field, optional)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(name, f"must be an integer, got {json.dumps(v)}")
        if choices is not None and v not in choices:
            raise self.fail(name, f"must be one of {list(choices)}, got {v}")
        if (low is not None and v < low) or (high is not None and v > high):
            raise self.fail(name, f"must be in [{low if low is not None else '-inf'}, "
                                  f"{high if high is not None else 'inf'}], got {v}")
        return v

    def number(self, d: dict, key: str, field: str = "", low: float | None = None, positive: bool = False,
               optional: bool = False, high: float | None = None) -> float | None:
        name = f"{field}.{key}" if field else key
        v = self.get(d, key, field, optional)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.fail(name, f"must be a finite number, got {json.dumps(v)}")
        if positive and v <= 0:
            raise self.fail(name, f"must be > 0, got {v}")
        if (low is not None and v < low) or (high is not None and v > high):
            raise self.fail(name, f"must be in [{low}, {high if high is not None else 'inf'}], got {v}")
        return float(v)

    def string(self, d: dict, key: str, field: str = "", choices: tuple[str, ...] | None = None) -> str:
        name = f"{field}.{key}" if field else key
        v = self.get(d, key, field)
        if not isinstance(v, str):
            raise self.fail(name, f"must be a string, got {json.dumps(v)}")
        if choices is not None and v not in choices:
            raise self.fail(name, f"must be one of {list(choices)}, got {v!r}")
        return v

    def version(self, d: dict, expected: int) -> None:
        v = d.get("version")
        if v != expected:
            raise self.fail("version", f"must be {expected} (this splitkernels reads version {expected}), "
                                       f"got {json.dumps(v)}")


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _check_quant(c: _Checker, v: Any, field: str) -> None:
    if v is None:
        return
    q = c.obj(v, field)
    c.integer(q, "bits", field, choices=tuple(WEIGHT_BITS))
    gs = c.integer(q, "group_size", field)
    if gs != -1 and gs < 1:
        raise c.fail(f"{field}.group_size", f"must be a positive integer or -1, got {gs}")
    clip = c.get(q, "clip_search", field, optional=True)
    if clip is not None and not isinstance(clip, bool):
        raise c.fail(f"{field}.clip_search", f"must be true or false, got {json.dumps(clip)}")


def _check_codec(c: _Checker, v: Any, field: str) -> None:
    codec = c.obj(v, field)
    if codec.get("kind") == "v2":  # a calibrated v2 config: from_dict checks every array and its fingerprint
        return
    c.string(codec, "threshold", field, THRESHOLD_MODES)
    c.string(codec, "mode", field, BIT_MODES)
    c.number(codec, "alpha", field, positive=True)
    c.number(codec, "tau", field, low=0.0, optional=True)
    c.integer(codec, "capacity", field, low=0)
    choices = c.get(codec, "bit_choices", field)
    if not isinstance(choices, list) or not all(isinstance(b, int) and not isinstance(b, bool) and b in CODEC_BITS
                                                for b in choices):
        raise c.fail(f"{field}.bit_choices", f"must be a list of integers from {list(CODEC_BITS)}, "
                                             f"got {json.dumps(choices)}")
    c.number(codec, "eps", field, positive=True, optional=True)
    c.number(codec, "avg_bits", field, positive=True, optional=True)


def load_plan(path: str):
    """A :class:`~splitkernels.planner.Plan` from ``splitkernels plan --out``, schema-checked."""
    from ..codec.spec import config_from_dict
    from ..planner import Plan
    from ..planner.optimizer import PLAN_VERSION

    c = _Checker(path)
    d = c.obj(read_json(path, "plan (--plan)"), "(top level)")
    c.version(d, PLAN_VERSION)
    c.integer(d, "split_layer", low=1)
    _check_quant(c, c.get(d, "front", ""), "front")
    _check_quant(c, c.get(d, "back", ""), "back")
    _check_codec(c, c.get(d, "codec", ""), "codec")
    c.integer(d, "max_seq_len", low=1)
    predicted = c.get(d, "predicted", "", optional=True)
    if predicted is not None:
        c.obj(predicted, "predicted")
    try:
        config_from_dict(d["codec"])
    except (TypeError, ValueError) as exc:
        raise c.fail("codec", str(exc)) from None
    return Plan.from_dict(d)


def load_quality(path: str):
    """A calibration :class:`~splitkernels.planner.quality.QualityTable` (``--quality``), schema-checked."""
    from ..planner.quality import QUALITY_TABLE_VERSION, QualityTable

    c = _Checker(path)
    d = c.obj(read_json(path, "calibration table (--quality)"), "(top level)")
    c.version(d, QUALITY_TABLE_VERSION)
    c.string(d, "model")
    c.string(d, "text")
    c.integer(d, "context", low=2)
    c.integer(d, "group_size")
    points = c.get(d, "points", "")
    if not isinstance(points, list) or not points:
        raise c.fail("points", f"must be a non-empty list, got {json.dumps(points)[:40]}")
    for i, p in enumerate(points):
        f = f"points[{i}]"
        p = c.obj(p, f)
        c.integer(p, "split_layer", f, low=1)
        c.integer(p, "front_bits", f, optional=True, choices=tuple(WEIGHT_BITS))
        c.integer(p, "back_bits", f, optional=True, choices=tuple(WEIGHT_BITS))
        if "front_method" in p:
            c.string(p, "front_method", f, choices=METHODS)
        if c.get(p, "codec", f) is not None:
            _check_codec(c, p["codec"], f"{f}.codec")
        for key in ("ppl_reference", "ppl"):
            c.number(p, key, f, positive=True)
        for key in ("kl", "bits_per_element", "code_bits", "outliers_per_token"):
            c.number(p, key, f, low=0.0)
        c.number(p, "top1_agreement", f, low=0.0, high=1.0)
        c.integer(p, "tokens", f, low=1)
        if "position_shift" in p:
            _check_position_shift(c, p["position_shift"], f"{f}.position_shift")
        if "id_bits" in p:
            c.integer(p, "id_bits", f, low=0, high=24)
        extra = set(p) - {"split_layer", "front_bits", "back_bits", "codec", "ppl_reference", "ppl", "kl",
                          "top1_agreement", "bits_per_element", "code_bits", "outliers_per_token", "tokens",
                          "front_method", "position_shift", "id_bits"}
        if extra:
            raise c.fail(f"{f}.{sorted(extra)[0]}", "is not a field of a calibration point")
    return QualityTable.from_json(json.dumps(d))


def _check_position_shift(c: _Checker, value: Any, field: str) -> None:
    """A calibration point's per-band shifts: what CodecConfigV2.position_shift allows."""
    if not isinstance(value, list):
        raise c.fail(field, f"must be a list, got {_kind(value)}")
    try:
        check_position_shift(value)
    except ValueError as exc:
        raise c.fail(field, str(exc)) from None


def load_profile(path: str, flag: str):
    """A measured :class:`~splitkernels.planner.profile.Profile` (``--edge-profile``/``--server-profile``)."""
    from ..planner.profile import PROFILE_VERSION, Profile

    c = _Checker(path)
    d = c.obj(read_json(path, f"profile ({flag})"), "(top level)")
    c.version(d, PROFILE_VERSION)
    prompt = c.integer(d, "prompt_tokens", low=1)
    formats = c.obj(c.get(d, "formats", ""), "formats")
    if not formats:
        raise c.fail("formats", "must name at least one weight format")
    for name, f in formats.items():
        field = f"formats.{name}"
        f = c.obj(f, field)
        for key in ("decode_layer_s", "prefill_layer_s", "decode_head_s", "prefill_head_s"):
            c.number(f, key, field, low=0.0)
    frames = c.obj(c.get(c.obj(c.get(d, "codec", ""), "codec"), "frames", "codec"), "codec.frames")
    for key in sorted({"1", str(prompt)}):
        entry = c.obj(c.get(frames, key, "codec.frames"), f"codec.frames.{key}")
        for which in ("encode_s", "decode_s"):
            c.number(entry, which, f"codec.frames.{key}", low=0.0)
    return Profile(d)
