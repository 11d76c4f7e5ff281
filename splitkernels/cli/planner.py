"""``splitkernels plan`` and ``splitkernels profile``."""
from __future__ import annotations

import argparse
import json
import time
from importlib import resources

from . import args as types
from .errors import Exit, InputFileError
from .files import load_profile, load_quality
from .models import CALIB_TOKENS_V2, calibrate_spec

# Calibration shipped with the package: SmolLM2-135M on Botchan (bench/e2e/run.py writes it).
DEFAULT_QUALITY = "smollm2_quality.json"


def _load_model(name: str, dtype_bytes: int = 2):
    """(loaded model, shape) for ``smollm2``, ``tiny`` (the random Llama of ``splitkernels demo --model
    tiny``, for smoke tests) or the path of a local Hugging Face folder or GGUF file; the shape
    counts ``dtype_bytes``-wide values."""
    from ..models import ModelShape
    from .models import load_model

    loaded = load_model(name)
    return loaded, ModelShape.from_model(loaded.model, name=name, dtype_bytes=dtype_bytes)


SEQ_LENS = (512, 1024, 2048, 4096, 8192)


def _seq_lens(model) -> tuple[int, ...]:
    """The candidate maximum lengths the model's positions allow."""
    from ..models import text_config

    limit = getattr(text_config(model.config), "max_position_embeddings", None)
    return tuple(n for n in SEQ_LENS if limit is None or n <= limit) or (int(limit),)


def _compute(device_name: str, profile_path: str | None, flag: str, shape):
    from ..planner.costs import Roofline
    from ..planner.devices import get_device

    if profile_path:
        return load_profile(profile_path, flag), f"profile {profile_path}"
    dev = get_device(device_name)
    return Roofline(dev, shape), dev.name


def _quality_table(path: str | None):
    from ..planner.quality import QualityTable

    if path:
        return load_quality(path)
    return QualityTable.from_json(resources.files("splitkernels.planner").joinpath(DEFAULT_QUALITY).read_text())


def _write(path: str, text: str, what: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise InputFileError(path, f"cannot write the {what}: {exc.strerror or exc}") from None


def _cmd_plan(args: argparse.Namespace) -> int:
    from ..planner.costs import Link
    from ..planner.devices import GIB, get_device
    from ..planner.optimizer import DTYPES, Infeasible, Limits, Scenario, plan

    t0 = time.perf_counter()
    table = _quality_table(args.quality)
    loaded, shape = _load_model(args.model, DTYPES[args.dtype].itemsize)
    seq_lens = _seq_lens(loaded.model)
    edge, edge_name = _compute(args.edge, args.edge_profile, "--edge-profile", shape)
    server, server_name = _compute(args.server, args.server_profile, "--server-profile", shape)
    edge_mem = int(args.edge_memory_gib * GIB) if args.edge_memory_gib else (
        get_device(args.edge).usable_bytes if not args.edge_profile else None)
    server_mem = int(args.server_memory_gib * GIB) if args.server_memory_gib else (
        get_device(args.server).usable_bytes if not args.server_profile else None)
    limits = Limits(
        edge_memory_bytes=edge_mem,
        server_memory_bytes=server_mem,
        max_token_latency_s=None if args.max_token_ms is None else args.max_token_ms / 1e3,
        max_ttft_s=None if args.max_ttft_ms is None else args.max_ttft_ms / 1e3,
        max_ppl_change=None if args.max_ppl_change is None else args.max_ppl_change / 100,
        max_kl=args.max_kl,
        min_seq_len=args.min_seq_len,
        sessions=args.sessions,
    )
    scenario = Scenario(shape, edge, server, Link(args.link_mbps, args.rtt_ms), args.prompt_tokens,
                        edge_name, server_name)
    try:
        result = plan(scenario, table, limits, args.objective, seq_lens, alternatives=args.alternatives,
                      dtype=args.dtype, wire_dtype=args.wire_dtype,
                      calibrate_codec=lambda split, spec: calibrate_spec(
                          loaded, split, spec, args.calib_tokens, wire=DTYPES[args.wire_dtype])[0])
    except Infeasible as exc:
        if args.json:
            print(json.dumps({"feasible": False, "binding": exc.binding, "explanation": exc.explanation}, indent=2))
        else:
            print(exc.explanation)  # the search's answer, not a failure of the command
        return Exit.INFEASIBLE
    if args.out:
        _write(args.out, result.plan.to_json(), "plan (--out)")
    verification = _verify(result.plan, scenario.link, args) if args.verify else None
    if args.json:
        out = {"feasible": True, "plan": result.plan.to_dict(),
               "alternatives": [p.to_dict() for p in result.alternatives]}
        if verification is not None:
            out["verification"] = verification.to_dict()
        print(json.dumps(out, indent=2))
    else:
        bounds = ", ".join(text for text, v in (
            (f"KL <= {args.max_kl}", args.max_kl), (f"perplexity <= +{args.max_ppl_change}%", args.max_ppl_change),
            (f"per token <= {args.max_token_ms} ms", args.max_token_ms)) if v is not None) or "none"
        print(f"{shape.name}: edge {edge_name}, server {server_name}, link {scenario.link}, "
              f"prompt {args.prompt_tokens} tokens, {args.dtype} weights, {args.wire_dtype} wire, objective "
              f"{args.objective} (limits: {bounds})")
        print("plan:")
        print(result.plan.summary())
        for i, alt in enumerate(result.alternatives, 1):
            print(f"runner-up {i}:")
            print(alt.summary())
        print(f"({result.candidates_scored} candidates scored in {time.perf_counter() - t0:.2f} s; latency and "
              f"memory modelled, quality measured by calibration)")
        if verification is not None:
            info = verification.info
            print(f"verify on this machine ({info['profile_machine']}, {info['threads']} threads, {info['clock']} "
                  f"clock; the plan run by the runtime, {info['new_tokens']} decoded tokens, link emulated):")
            print(verification.table())
    if verification is not None and not verification.sizes_ok:
        return Exit.INTERNAL
    return 0


def _verify(plan, link, args: argparse.Namespace):
    """Run ``plan`` through the runtime here and compare (``--verify``)."""
    from ..eval import load_text
    from ..planner.verify import verify_plan
    from .models import load_model

    loaded = load_model(args.model)
    text = loaded.encode_text(load_text("botchan"))[0]
    need = plan.prompt_tokens + args.verify_eval_tokens
    if text.shape[0] < need:
        text = text.repeat(-(-need // text.shape[0]))
    prompt = text[: plan.prompt_tokens].unsqueeze(0)
    evaluation = text[plan.prompt_tokens: need] if args.verify_eval_tokens else None
    profile = load_profile(args.edge_profile, "--edge-profile").data if args.edge_profile else None

    def fresh():
        return load_model(args.model).model

    context = min(512, args.verify_eval_tokens) if args.verify_eval_tokens else 512
    return verify_plan(plan, fresh, link, prompt, args.verify_tokens, evaluation, context, profile,
                       clock=args.verify_clock)


def _limit(kind):
    """An argparse type: ``kind`` or ``none`` (the limit is off)."""

    def parse(text: str):
        return None if text.strip().lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _formats(text: str):
    """``--formats``: comma-separated ``dense`` and/or weight bits."""
    from ..nn import QuantConfig
    from ..ops import WEIGHT_BITS

    out = []
    for item in text.split(","):
        item = item.strip()
        if item == "dense":
            out.append(None)
        elif item.isdigit() and int(item) in WEIGHT_BITS:
            out.append(QuantConfig(int(item), 64))
        else:
            raise argparse.ArgumentTypeError(f"each entry must be 'dense' or one of {list(WEIGHT_BITS)}, "
                                             f"got {item!r}")
    return out


def _cmd_profile(args: argparse.Namespace) -> int:
    from ..planner.profile import measure_profile

    loaded, _ = _load_model(args.model)
    data = measure_profile(loaded.model, args.formats, args.prompt_tokens, args.decode_steps, args.repeats,
                           name=args.model, clock=args.clock)
    text = json.dumps(data, indent=2)
    if args.out:
        _write(args.out, text, "profile (--out)")
    print(text)
    return 0


def register(subparsers) -> None:
    """Add the ``plan`` and ``profile`` subcommands."""
    from ..planner.devices import devices
    from ..planner.optimizer import DEFAULT_MAX_KL, DEFAULT_MAX_PPL_CHANGE, DEFAULT_OBJECTIVE, DTYPES, OBJECTIVES

    edge_names = sorted(devices("edge"))
    server_names = sorted(devices("server"))
    p = subparsers.add_parser("plan", help="choose split layer, weight bits, codec and max sequence length",
                              description="Search split settings under memory, latency and quality limits. "
                                          "Latency and memory are modelled; quality comes from a calibration table. "
                                          f"Exit status {int(Exit.INFEASIBLE)} when no configuration meets the "
                                          "limits.")
    p.add_argument("--model", default="smollm2", help="smollm2 (default), gemma3, qwen2.5-coder, tiny, or a model folder or .gguf file")
    p.add_argument("--quality", help="calibration table JSON (default: the shipped SmolLM2 table)")
    p.add_argument("--edge", default="jetson-orin-nano-8gb", choices=edge_names)
    p.add_argument("--server", default="nvidia-a100-80gb", choices=server_names)
    p.add_argument("--edge-profile", help="measured profile JSON for the edge (replaces the roofline)")
    p.add_argument("--server-profile", help="measured profile JSON for the server")
    p.add_argument("--link-mbps", type=types.positive, default=10.0)
    p.add_argument("--rtt-ms", type=types.non_negative, default=20.0)
    p.add_argument("--prompt-tokens", type=types.positive_int, default=128)
    p.add_argument("--edge-memory-gib", type=types.positive, help="memory for the model on the edge (default: device's)")
    p.add_argument("--server-memory-gib", type=types.positive)
    p.add_argument("--max-token-ms", type=types.positive, help="per-token latency limit")
    p.add_argument("--max-ttft-ms", type=types.positive, help="time-to-first-token limit")
    p.add_argument("--max-ppl-change", type=_limit(types.non_negative), default=100 * DEFAULT_MAX_PPL_CHANGE,
                   help=f"perplexity increase limit in percent (default {100 * DEFAULT_MAX_PPL_CHANGE:g}; 'none': off)")
    p.add_argument("--max-kl", type=_limit(types.non_negative), default=DEFAULT_MAX_KL,
                   help=f"KL divergence limit in nats/token (default {DEFAULT_MAX_KL:g}; 'none': off)")
    p.add_argument("--min-seq-len", type=types.positive_int, default=512)
    p.add_argument("--sessions", type=types.positive_int, default=1, help="concurrent sessions the server must hold")
    p.add_argument("--objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE,
                   help="latency (default): fastest plan within the quality limits; quality: lowest KL within the "
                        "latency and memory limits; lossless: fastest plan with lossless transfer")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16",
                   help="precision of dense weights, activations and KV caches on both sides (default float16)")
    p.add_argument("--wire-dtype", choices=sorted(DTYPES), default="float16",
                   help="precision the edge sends hidden states in (default float16)")
    p.add_argument("--verify", action="store_true",
                   help="run the chosen plan through the runtime on this machine and print predicted vs measured "
                        "bytes, memory, latency (with this machine's profile, or --edge-profile) and quality; "
                        f"exit status {int(Exit.INTERNAL)} when bytes or memory are off by more than 5 percent "
                        "(latency, judged at 25 percent, is reported only: timings depend on the machine's load)")
    p.add_argument("--verify-tokens", type=types.positive_int, default=16, help="tokens decoded by --verify")
    p.add_argument("--verify-clock", choices=("wall", "cpu"), default="wall",
                   help="time --verify's profile and run in elapsed time (wall, default) or in this process's CPU "
                        "time (cpu: on a machine shared with other work; run single-threaded, OMP_NUM_THREADS=1)")
    p.add_argument("--verify-eval-tokens", type=types.non_negative_int, default=1024,
                   help="Botchan tokens --verify scores for KL and perplexity (0: skip)")
    p.add_argument("--alternatives", type=types.non_negative_int, default=3)
    p.add_argument("--calib-tokens", type=types.integer(2, 1 << 20), default=CALIB_TOKENS_V2,
                   help="tokens that calibrate a chosen codec v2 plan: windows of prose (Botchan, disjoint from the "
                        "table's text), Python source and Python's reference docs in turn")
    p.add_argument("--json", action="store_true", help="print JSON (plan and alternatives)")
    p.add_argument("--out", help="write the plan JSON here (the runtime accepts it: --plan FILE)")
    p.set_defaults(func=_cmd_plan)

    q = subparsers.add_parser("profile", help="measure per-layer and codec times on this machine",
                              description="Time decoder layers (prefill and decode) per weight format, "
                                          "the LM head and the codec; writes JSON for plan --edge-profile.")
    q.add_argument("--model", default="smollm2", help="smollm2 (default), gemma3, qwen2.5-coder, tiny, or a model folder or .gguf file")
    q.add_argument("--formats", type=_formats, default="dense,4,8",
                   help="comma-separated: dense and/or weight bits (group 64)")
    q.add_argument("--prompt-tokens", type=types.positive_int, default=128)
    q.add_argument("--decode-steps", type=types.positive_int, default=16)
    q.add_argument("--repeats", type=types.positive_int, default=2)
    q.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="elapsed time (wall) or this process's CPU time (cpu: steadier on a shared machine, "
                        "with OMP_NUM_THREADS=1)")
    q.add_argument("--out", help="write the profile JSON here")
    q.set_defaults(func=_cmd_profile)
