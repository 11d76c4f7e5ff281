"""``splitkernels plan`` and ``splitkernels profile``."""
from __future__ import annotations

import argparse
import json
import time
from importlib import resources

from .costs import Link, ModelShape, Roofline
from .devices import GIB, devices, get_device
from .optimizer import OBJECTIVES, Infeasible, Limits, Scenario, plan
from .quality import QualityTable

# Calibration shipped with the package: SmolLM2-135M on Botchan (bench/e2e/run.py writes it).
DEFAULT_QUALITY = "smollm2_quality.json"


def _load_model(name: str):
    """(model, shape) for ``smollm2``, ``tiny`` (a random 4-layer Llama, for smoke tests) or the
    path of a local Hugging Face folder or GGUF file."""
    from ..models import load_model, tiny_model

    model = tiny_model("llama") if name == "tiny" else load_model(name).model
    return model, ModelShape.from_model(model, name=name)


def _compute(device_name: str, profile_path: str | None, shape: ModelShape):
    if profile_path:
        from .profile import Profile

        return Profile.load(profile_path), f"profile {profile_path}"
    dev = get_device(device_name)
    return Roofline(dev, shape), dev.name


def _quality_table(path: str | None) -> QualityTable:
    if path:
        return QualityTable.load(path)
    return QualityTable.from_json(resources.files(__package__).joinpath(DEFAULT_QUALITY).read_text())


def _cmd_plan(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    _, shape = _load_model(args.model)
    edge, edge_name = _compute(args.edge, args.edge_profile, shape)
    server, server_name = _compute(args.server, args.server_profile, shape)
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
    table = _quality_table(args.quality)
    try:
        result = plan(scenario, table, limits, args.objective, alternatives=args.alternatives)
    except Infeasible as exc:
        if args.json:
            print(json.dumps({"feasible": False, "binding": exc.binding, "explanation": exc.explanation}, indent=2))
        else:
            print(exc.explanation)
        return 2
    if args.out:
        with open(args.out, "w") as f:
            f.write(result.plan.to_json())
    if args.json:
        print(json.dumps({"feasible": True, "plan": result.plan.to_dict(),
                          "alternatives": [p.to_dict() for p in result.alternatives]}, indent=2))
        return 0
    print(f"{shape.name}: edge {edge_name}, server {server_name}, link {scenario.link}, "
          f"prompt {args.prompt_tokens} tokens, objective {args.objective}")
    print("plan:")
    print(result.plan.summary())
    for i, alt in enumerate(result.alternatives, 1):
        print(f"runner-up {i}:")
        print(alt.summary())
    print(f"({result.candidates_scored} candidates scored in {time.perf_counter() - t0:.2f} s; latency and memory "
          f"modelled, quality measured by calibration)")
    return 0


def _parse_format(text: str):
    from ..nn import QuantConfig

    return None if text == "dense" else QuantConfig(int(text), 64)


def _cmd_profile(args: argparse.Namespace) -> int:
    from .profile import measure_profile

    model, _ = _load_model(args.model)
    formats = [_parse_format(f) for f in args.formats.split(",")]
    data = measure_profile(model, formats, args.prompt_tokens, args.decode_steps, args.repeats, name=args.model)
    text = json.dumps(data, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


def register(subparsers) -> None:
    """Add the ``plan`` and ``profile`` subcommands to the ``splitkernels`` parser."""
    edge_names = sorted(devices("edge"))
    server_names = sorted(devices("server"))
    p = subparsers.add_parser("plan", help="choose split layer, weight bits, codec and max sequence length",
                              description="Search split settings under memory, latency and quality limits. "
                                          "Latency and memory are modelled; quality comes from a calibration table.")
    p.add_argument("--model", default="smollm2", help="smollm2 (default), tiny, or a model folder or .gguf file")
    p.add_argument("--quality", help="calibration table JSON (default: the shipped SmolLM2 table)")
    p.add_argument("--edge", default="jetson-orin-nano-8gb", choices=edge_names)
    p.add_argument("--server", default="nvidia-a100-80gb", choices=server_names)
    p.add_argument("--edge-profile", help="measured profile JSON for the edge (replaces the roofline)")
    p.add_argument("--server-profile", help="measured profile JSON for the server")
    p.add_argument("--link-mbps", type=float, default=10.0)
    p.add_argument("--rtt-ms", type=float, default=20.0)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--edge-memory-gib", type=float, help="memory for the model on the edge (default: device's)")
    p.add_argument("--server-memory-gib", type=float)
    p.add_argument("--max-token-ms", type=float, help="per-token latency limit")
    p.add_argument("--max-ttft-ms", type=float, help="time-to-first-token limit")
    p.add_argument("--max-ppl-change", type=float, help="perplexity increase limit in percent")
    p.add_argument("--max-kl", type=float, help="KL divergence limit (nats/token)")
    p.add_argument("--min-seq-len", type=int, default=512)
    p.add_argument("--sessions", type=int, default=1, help="concurrent sessions the server must hold")
    p.add_argument("--objective", choices=OBJECTIVES, default="quality")
    p.add_argument("--alternatives", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print JSON (plan and alternatives)")
    p.add_argument("--out", help="write the plan JSON here (the runtime accepts it: --plan FILE)")
    p.set_defaults(func=_cmd_plan)

    q = subparsers.add_parser("profile", help="measure per-layer and codec times on this machine",
                              description="Time decoder layers (prefill and decode) per weight format, "
                                          "the LM head and the codec; writes JSON for plan --edge-profile.")
    q.add_argument("--model", default="smollm2", help="smollm2 (default), tiny, or a model folder or .gguf file")
    q.add_argument("--formats", default="dense,4,8", help="comma-separated: dense and/or weight bits (group 64)")
    q.add_argument("--prompt-tokens", type=int, default=128)
    q.add_argument("--decode-steps", type=int, default=16)
    q.add_argument("--repeats", type=int, default=2)
    q.add_argument("--out", help="write the profile JSON here")
    q.set_defaults(func=_cmd_profile)

