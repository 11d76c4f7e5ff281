"""Which model a command runs, and how it is split: the one place the command line selects
models (``--model``), so a new kind of model needs a change here only."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..codec import CodecConfig, CodecConfigV2
from ..codec.calibrate import DECODE_FRAME_BITS, DEFAULT_KL_PROXY
from ..codec.frame import count_width
from ..codec.frame_v2 import FRAME_CODERS
from ..codec.rate import RATE_BITS
from ..models import LoadedModel
from ..models.loading import BUILT_IN
from ..nn.config import SCALE_DTYPES
from . import args as types
from .errors import InputFileError, UsageError
from .files import load_plan, read_bytes

# Default calibration text for a gptq front: Botchan tokens [16384, 16384 + 16384), after every
# token the demo (--eval-tokens) and the project's perplexity scoring (8192 tokens) read. 16384
# tokens rather than 8192: a 3-bit g64 SmolLM2 front to layer 10 costs +12% perplexity instead of
# +15% (bench/results/quality_calibrated_v3), for twice the calibration time.
CALIBRATION_START, CALIBRATION_TOKENS = 16384, 16384
# The v1 codec defaults are CodecConfig's own (measured choice, see splitkernels/codec/config.py).
DEFAULT_CODEC = CodecConfig()
CODEC_KINDS = ("v2", "v1", "passthrough")
# Codec v2 calibration: its prose (Botchan) starts here, after any evaluation tokens (disjoint).
CALIB_OFFSET = 8192
CALIB_WINDOW = 512
CALIB_TOKENS_V2 = 3 * CALIB_WINDOW  # one window of each kind of calibration text


def load_model(which: str, family: str = "llama", seed: int = 0) -> LoadedModel:
    """``smollm2``, ``gemma3``, ``qwen2.5-coder``, ``tiny`` (random, ``family``/``seed``), ``auto`` (SmolLM2 when installed) or the
    path of a local Hugging Face folder or ``.gguf`` file (:func:`splitkernels.models.load_model`),
    with the command line's errors: a bad name or flag is a usage error, an unreadable model an
    input-file error."""
    from .. import models

    if which in BUILT_IN:
        if which in models.PACKAGED and not models.packaged_available(which):
            raise UsageError(f"--model {which}: its package is not installed ({models.PACKAGED[which].install})")
        if which not in models.PACKAGED and family not in models.FAMILIES and not models.is_causal_lm_type(family):
            raise UsageError(f"--family must be one of {list(models.FAMILIES)} or another transformers causal-LM "
                             f"model type, got {family!r}")
    elif not Path(which).expanduser().exists():
        raise UsageError(f"--model must be one of {list(BUILT_IN)} or an existing model folder or .gguf "
                         f"file; {which!r} is neither")
    try:
        return models.load_model(which, family, seed)
    except (ValueError, OSError) as exc:
        raise InputFileError(f"--model {which}: {exc}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    from ..models import FAMILIES

    g = p.add_argument_group("model")
    g.add_argument("--model", default="auto",
                   help="auto (SmolLM2-135M when its package is installed, else a tiny random model), smollm2, "
                        "gemma3 (Gemma 3 270M, from its package), qwen2.5-coder (Qwen2.5-Coder-0.5B-Instruct, from its "
                        "six chunk packages), tiny, or the path of a model folder (save_pretrained) or .gguf file")
    g.add_argument("--family", default="llama", help=f"family of the tiny model ({'/'.join(FAMILIES)}, or any other "
                                                      "transformers causal-LM model type: bloom, falcon, ...)")
    g.add_argument("--seed", type=types.integer(0, 2**63 - 1), default=0, help="seed of the tiny model's weights")
    g.add_argument("--split-layer", type=types.positive_int, default=None,
                   help="edge keeps layers 1..N (default: a third of depth)")
    g.add_argument("--group-size", type=types.positive_int, default=64, help="OPSC weight group size")
    g.add_argument("--scale-dtype", choices=tuple(SCALE_DTYPES), default=None,
                   help="OPSC weights' scales and zeros (default: the model's dtype; float16 in an fp32 model "
                        "reads 5 bits a 4-bit weight in groups of 32 instead of 6)")
    g.add_argument("--plan", default=None,
                   help="plan JSON from `splitkernels plan --out`: sets split layer, codec, OPSC weights and "
                        "the server's max sequence length")


def add_front_args(p: argparse.ArgumentParser) -> None:
    """The edge's OPSC weights: bits, quantiser and (for a calibrated quantiser) its text."""
    p.add_argument("--front-bits", type=int, choices=(2, 3, 4, 8), default=None,
                   help="OPSC: edge layers' weight bits (2/3/4/8)")
    p.add_argument("--front-method", choices=("rtn", "gptq"), default=None,
                   help="OPSC: edge weight quantiser, rtn (round to nearest, default) or gptq (calibrated on "
                        "--calibration; a plan's own choice otherwise)")
    p.add_argument("--calibration", default=None,
                   help="UTF-8 text file whose tokens calibrate a gptq front (default: Botchan from token "
                        f"{CALIBRATION_START}, after every token the demo scores)")
    p.add_argument("--calibration-tokens", type=types.integer(2), default=CALIBRATION_TOKENS,
                   help="calibration tokens taken from the text")


def calibration_ids(settings: SplitSettings, side: str, args: argparse.Namespace,
                    loaded: LoadedModel) -> torch.Tensor | None:
    """Calibration token ids for the OPSC weights ``side`` quantises, or None when no config there
    is calibrated (method other than ``"rtn"``)."""
    configs = settings.opsc(side) or ()
    if not any(c is not None and c.method != "rtn" for c in configs):
        return None
    path, count = getattr(args, "calibration", None), args.calibration_tokens
    if path is None:
        from ..eval import load_text

        ids = loaded.encode_text(load_text("botchan"))[0, CALIBRATION_START:CALIBRATION_START + count]
        scored = getattr(args, "eval_tokens", 0)
        if scored > CALIBRATION_START:
            raise UsageError(f"--eval-tokens {scored} would score the default calibration text (Botchan from "
                             f"token {CALIBRATION_START}); pass --calibration FILE or fewer --eval-tokens")
    else:
        ids = loaded.encode_text(read_bytes(path, "calibration text (--calibration)").decode("utf-8", "replace"))[0, :count]
    if ids.shape[0] < 2:
        raise InputFileError(path or "botchan", f"has {ids.shape[0]} tokens; calibration needs at least 2")
    return ids


def add_codec_args(p: argparse.ArgumentParser, default: str = "v1") -> None:
    """Codec flags; ``default`` is the command's codec when neither --codec nor a v1-only flag says."""
    g = p.add_argument_group("codec")
    g.add_argument("--codec", choices=CODEC_KINDS, default=None,
                   help=f"v2 (calibrated equalisation + static rANS, calibrated here on prose, Python source and "
                        f"Python's docs, disjoint from the evaluation text), v1 (TS + TAB-Q) or passthrough "
                        f"(lossless); default {default}"
                        + (" (v1 when --avg-bits is given)" if default != "v1" else ""))
    g.add_argument("--bits", type=types.number(1.0, 16.0), default=None,
                   help="v2: target bits per element of 512-token frames (default: with --sensitivity fisher, the "
                        f"rate at which the Fisher's KL estimate is {DEFAULT_KL_PROXY}, one-token frames at most about "
                        f"{DECODE_FRAME_BITS} bits at the calibrated step, and per-frame rate control holding every "
                        f"frame at {RATE_BITS} on any text; uniform: 4.0)")
    g.add_argument("--no-rate-control", action="store_true",
                   help="v2: send every frame at the calibrated step (default: where the codec's calibration stored "
                        "a rate policy, the edge scales each frame's step to meet it on the text it sends)")
    g.add_argument("--sensitivity", choices=("fisher", "uniform"), default="fisher",
                   help="v2: channel precision from a diagonal Fisher of the calibration text (one backward "
                        "pass per window) or uniform (forward passes only)")
    g.add_argument("--coder", choices=FRAME_CODERS, default=None,
                   help="v2: symbol coder of the frames: rans (default, the fewest bytes), auto or rice (the Rice "
                        "coder for long prefill frames: ~0.1 bit per element more, 2-3x faster, worth it on links "
                        "above ~50 Mbit/s), planes (the same codes in bit planes, up to ~1.3x faster again where "
                        "both ends have AVX-512 VBMI2), slots (long frames: ~0.2 bit more than rice, a fixed-width "
                        "slot per channel, 1.2-2x faster than planes with AVX-512 VBMI2 + GFNI, about rice's speed "
                        "on AVX2) or nibble (every frame: ~0.4 bit more, fixed 4-bit slots)")
    g.add_argument("--calib-tokens", type=types.integer(2, 1 << 20), default=CALIB_TOKENS_V2,
                   help="v2: calibration tokens, windows of prose (Botchan, after the evaluation tokens), "
                        "Python source and Python's reference docs in turn")
    p.set_defaults(codec_default=default)
    g.add_argument("--alpha", type=types.positive, default=DEFAULT_CODEC.alpha, help="v1: outlier threshold, in token rms")
    g.add_argument("--capacity", type=types.non_negative_int, default=DEFAULT_CODEC.capacity,
                   help="v1: max outliers per token")
    g.add_argument("--eps", type=types.positive, default=DEFAULT_CODEC.eps, help="v1: relative error target (mode error)")
    g.add_argument("--avg-bits", type=types.positive, default=None, help="v1: bits per element budget (mode budget)")
    g.add_argument("--lossless", action="store_true", help="send hidden states raw (passthrough codec)")


@dataclass(frozen=True)
class SplitSettings:
    """How a command splits its model: from ``--plan`` when given, else from the flags."""

    split_layer: int
    codec: CodecConfig | CodecConfigV2
    front: Any  # QuantConfig | None
    back: Any
    max_seq_len: int | None  # the plan's, None without a plan
    plan_path: str | None
    calibration: dict | None = None  # how a v2 codec was calibrated (text, tokens, sensitivity, seconds)
    dtype: Any = None  # torch dtype the plan sizes the model for; None: as loaded
    wire_dtype: Any = None  # torch dtype of hidden states on the wire; None: the model's
    coder: str | None = None  # v2 frames' symbol coder (--coder); None: rANS
    rate_control: bool = True  # per-frame rate control where the v2 codec carries a policy (--no-rate-control)

    def split_config(self, side: str):
        """The runtime's SplitConfig for ``side`` ("edge", "server" or "both"): only that side's
        OPSC weights, the plan's wire dtype."""
        from ..runtime import SplitConfig

        front, back = self.opsc(side) or (None, None)
        return SplitConfig(self.split_layer, self.codec, front, back, wire_dtype=self.wire_dtype, coder=self.coder,
                           rate_control=self.rate_control)

    def prepare(self, model):
        """Cast ``model`` to the plan's dtype (what its memory was planned for); the model itself
        without a plan."""
        if self.dtype is not None:
            model.to(self.dtype)
        return model

    def opsc(self, side: str):
        """The OPSC weight configs a ``side`` ("edge", "server" or "both") quantises, or None."""
        front = None if side == "server" else self.front
        back = None if side == "edge" else self.back
        return None if front is None and back is None else (front, back)


def budget_floor(d: int, bit_choices: tuple[int, ...]) -> float:
    """The fewest frame bits per element a budget can reach at hidden size ``d``: every token
    takes at least the narrowest width plus its metadata (width, step, lo, outlier count)."""
    return min(bit_choices) + 8.0 * (5 + count_width(d)) / d


def split_settings(args: argparse.Namespace, loaded: LoadedModel) -> SplitSettings:
    """Resolve split layer, codec, frame coder and OPSC weights for ``loaded``; errors name the flag
    or field."""
    settings = _split_and_codec(args, loaded)
    coder = getattr(args, "coder", None)
    if coder not in (None, "rans") and not isinstance(settings.codec, CodecConfigV2):
        raise UsageError(f"--coder {coder} needs codec v2 (v1 and passthrough frames have one coder)")
    return replace(settings, coder=coder, rate_control=not getattr(args, "no_rate_control", False))


def _split_and_codec(args: argparse.Namespace, loaded: LoadedModel) -> SplitSettings:
    from ..nn import QuantConfig

    layers = loaded.num_layers
    if getattr(args, "plan", None) is not None:
        if getattr(args, "front_method", None) is not None:
            raise UsageError("--front-method and --plan: the plan sets the edge's quantiser (its front.method)")
        plan = load_plan(args.plan)
        if not 1 <= plan.split_layer < layers:
            raise InputFileError(args.plan, f"must be in [1, {layers - 1}] for {loaded.name} ({layers} layers), "
                                            f"got {plan.split_layer}", "split_layer")
        from ..planner.optimizer import DTYPES

        return SplitSettings(plan.split_layer, plan.codec, plan.front, plan.back, plan.max_seq_len, args.plan,
                             dtype=DTYPES[plan.dtype], wire_dtype=DTYPES[plan.wire_dtype])
    split = args.split_layer if args.split_layer is not None else max(1, round(layers / 3))
    if not 1 <= split < layers:
        raise UsageError(f"--split-layer must be in [1, {layers - 1}] for {loaded.name} ({layers} layers), "
                         f"got {split}")
    front_bits, back_bits = getattr(args, "front_bits", None), getattr(args, "back_bits", None)
    front_method = getattr(args, "front_method", None)
    if front_method is not None and not front_bits:
        raise UsageError(f"--front-method {front_method} needs --front-bits (the edge weights it quantises)")
    scale_dtype = getattr(args, "scale_dtype", None)
    front = QuantConfig(front_bits, args.group_size, method=front_method or "rtn",
                        scale_dtype=scale_dtype) if front_bits else None
    back = QuantConfig(back_bits, args.group_size, scale_dtype=scale_dtype) if back_bits else None
    kind = codec_kind(args)
    if kind is None:  # a server: the edge chooses the codec
        codec = DEFAULT_CODEC
    elif kind == "passthrough":
        codec = CodecConfig.passthrough()
    elif kind == "v2":
        codec, calibration = calibrate_v2(args, loaded, split)
        return SplitSettings(split, codec, front, back, None, None, calibration,
                             wire_dtype=getattr(torch, calibration["wire_dtype"]))
    elif args.avg_bits is not None:
        codec = CodecConfig(alpha=args.alpha, capacity=args.capacity, mode="budget", avg_bits=args.avg_bits)
        floor = budget_floor(loaded.hidden_size, codec.bit_choices)
        if args.avg_bits < floor:
            raise UsageError(f"--avg-bits {args.avg_bits:g} is below what the codec can send for d="
                             f"{loaded.hidden_size}: at least {floor:.2f} bits/element (the narrowest width, "
                             f"{min(codec.bit_choices)} bits, plus {5 + count_width(loaded.hidden_size)} bytes of "
                             f"metadata per token)")
    else:
        codec = CodecConfig(alpha=args.alpha, capacity=args.capacity, eps=args.eps)
    return SplitSettings(split, codec, front, back, None, None)


def codec_kind(args: argparse.Namespace) -> str | None:
    """The codec a command line asks for (None on a server, which has no codec flags)."""
    if not hasattr(args, "lossless"):
        return None
    kind = args.codec
    if args.lossless:
        if kind not in (None, "passthrough"):
            raise UsageError(f"--lossless sends raw values; it cannot be combined with --codec {kind}")
        return "passthrough"
    if args.avg_bits is not None:
        if kind not in (None, "v1"):
            raise UsageError(f"--avg-bits is a v1 budget; with --codec {kind} use --bits (v2) or drop it")
        return "v1"
    return kind or args.codec_default


def calibrate_v2(args: argparse.Namespace, loaded: LoadedModel, split: int) -> tuple[CodecConfigV2, dict]:
    """Calibrate codec v2 for ``loaded`` split after ``split`` on the mixed calibration text, whose
    prose starts after the evaluation tokens (``--eval-tokens``, if the command has it), so the two
    never overlap."""
    spec = {"kind": "v2", "sensitivity": args.sensitivity, **({} if args.bits is None else {"bits": args.bits})}
    return calibrate_spec(loaded, split, spec, args.calib_tokens, max(CALIB_OFFSET, getattr(args, "eval_tokens", 0)))


def calibrate_spec(loaded: LoadedModel, split: int, spec: dict, tokens: int, start: int = CALIB_OFFSET,
                   wire: torch.dtype | None = None) -> tuple[CodecConfigV2, dict]:
    """Calibrate the v2 ``spec`` for ``loaded`` split after ``split`` on ``tokens`` tokens of the
    mixed calibration text (:mod:`splitkernels.eval.calibration_text`: windows of prose -- Botchan
    from token ``start`` --, Python source and Python's reference docs in turn). ``wire`` (None:
    :func:`wire_dtype_for` chooses) is the dtype the edge sends. Returns the config and how it was
    calibrated (for reports)."""
    import time

    from ..codec.spec import config_for_model
    from ..eval.calibration_text import calibration_windows
    from ..models import text_config

    positions = getattr(text_config(loaded.model.config), "max_position_embeddings", None) or CALIB_WINDOW
    window = min(CALIB_WINDOW, positions, tokens)
    try:
        windows, used = calibration_windows(lambda text: loaded.encode_text(text)[0], tokens, window, prose_start=start)
    except ValueError as exc:
        raise UsageError(f"--calib-tokens {tokens}: {exc}") from None
    t0 = time.perf_counter()
    wire = wire or wire_dtype_for(loaded.model, split, windows[0])
    config = config_for_model(spec, loaded.model, split, windows, wire_dtype=wire)
    calibration = {"texts": used, "tokens": tokens, "window": window,
                   "sensitivity": spec.get("sensitivity", "uniform"), "target_bits": spec.get("bits"),
                   "estimated_bits": config.info.get("estimated_bits"), "wire_dtype": str(wire).replace("torch.", ""),
                   "seconds": time.perf_counter() - t0}
    return config, calibration


def wire_dtype_for(model, split: int, ids: torch.Tensor) -> torch.dtype:
    """The dtype the edge sends: the model's own when it is 16-bit, else fp16 -- unless the split
    hidden state of ``ids`` comes within 2x of fp16's largest value (massive activations); then the
    model's fp32. Codec v2 quantises the values in this dtype and sends only escapes and raw tokens
    at its width, so fp32 costs a few bytes per frame where bf16 would round every value first."""
    from ..codec.sensitivity import split_hidden_states

    dtype = next(model.parameters()).dtype
    if dtype in (torch.float16, torch.bfloat16):
        return dtype
    with torch.no_grad():
        peak = float(split_hidden_states(model, [ids], split).abs().max())
    return torch.float16 if peak <= torch.finfo(torch.float16).max / 2 else dtype
