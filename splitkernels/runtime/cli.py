"""``splitkernels serve | edge | demo``: the two halves as separate processes, and the main job
(a split generation over gRPC on loopback with a report of bytes, latency and quality)."""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path

import torch

from ..codec import CodecConfig
from ..models import LoadedModel
from .grpc_transport import GrpcServer, GrpcTransport, TlsFiles
from .link import LinkEmulator
from .sessions import Limits
from .split_model import SplitModel, split_model
from .transport import Transport

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."
# The codec defaults are CodecConfig's own (measured choice, see splitkernels/codec/config.py).
DEFAULT_CODEC = CodecConfig()
TOKEN_ENV = "SPLITKERNELS_TOKEN"


def load_model(which: str, family: str = "llama", seed: int = 0) -> LoadedModel:
    """``smollm2``, ``tiny`` (random, ``family``/``seed``), ``auto`` (SmolLM2 when installed), or
    the path of a local Hugging Face folder or GGUF file (see :func:`splitkernels.models.load_model`)."""
    from ..models import load_model as load

    return load(which, family, seed)


def _plan(args: argparse.Namespace):
    """The ``--plan`` file (from ``splitkernels plan --out``), or None; it overrides split, codec and OPSC."""
    if getattr(args, "plan", None) is None:
        return None
    from ..planner import Plan

    return Plan.from_json(Path(args.plan).read_text())


def _codec_from_args(args: argparse.Namespace) -> CodecConfig:
    plan = _plan(args)
    if plan is not None:
        return plan.codec
    if args.lossless:
        return CodecConfig.passthrough()
    if args.avg_bits is not None:
        return CodecConfig(alpha=args.alpha, capacity=args.capacity, mode="budget", avg_bits=args.avg_bits)
    return CodecConfig(alpha=args.alpha, capacity=args.capacity, eps=args.eps)


def _opsc_from_args(args: argparse.Namespace, side: str):
    from ..nn import QuantConfig

    plan = _plan(args)
    if plan is not None:
        front, back = plan.front, plan.back
    else:
        front = QuantConfig(args.front_bits, args.group_size) if getattr(args, "front_bits", None) else None
        back = QuantConfig(args.back_bits, args.group_size) if getattr(args, "back_bits", None) else None
    if side == "edge":
        back = None
    elif side == "server":
        front = None
    return None if front is None and back is None else (front, back)


def _split_layer(args: argparse.Namespace, loaded: LoadedModel) -> int:
    plan = _plan(args)
    if plan is not None:
        return plan.split_layer
    layers = loaded.model.config.num_hidden_layers
    return args.split_layer if args.split_layer is not None else max(1, round(layers / 3))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="auto",
                   help="auto (SmolLM2-135M when its package is installed, else tiny), smollm2, tiny, or the path of "
                        "a local Hugging Face model folder (save_pretrained) or .gguf file")
    g.add_argument("--family", default="llama", help="family of the tiny model (llama/mistral/qwen2/gpt2/opt)")
    g.add_argument("--seed", type=int, default=0, help="seed of the tiny model's weights")
    g.add_argument("--split-layer", type=int, default=None, help="edge keeps layers 1..N (default: a third of depth)")
    g.add_argument("--group-size", type=int, default=64, help="OPSC weight group size")
    g.add_argument("--plan", default=None,
                   help="plan JSON from `splitkernels plan --out`: sets split layer, codec and OPSC weights")


def _add_codec_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("codec (TS + TAB-Q)")
    g.add_argument("--alpha", type=float, default=DEFAULT_CODEC.alpha, help="outlier threshold, in token rms")
    g.add_argument("--capacity", type=int, default=DEFAULT_CODEC.capacity, help="max outliers per token")
    g.add_argument("--eps", type=float, default=DEFAULT_CODEC.eps, help="relative error target (mode error)")
    g.add_argument("--avg-bits", type=float, default=None, help="bits per element budget (mode budget)")
    g.add_argument("--lossless", action="store_true", help="send hidden states raw (passthrough codec)")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--max-new-tokens", type=int, default=24)
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--sample-seed", type=int, default=None)
    g.add_argument("--bandwidth-mbps", type=float, default=None, help="emulate a link of this bandwidth")
    g.add_argument("--rtt-ms", type=float, default=0.0, help="emulated round-trip time (with --bandwidth-mbps)")
    g.add_argument("--json", action="store_true", help="machine-readable output")


def _add_connection_args(p: argparse.ArgumentParser, server: bool) -> None:
    g = p.add_argument_group("connection")
    if server:
        g.add_argument("--host", default="127.0.0.1")
        g.add_argument("--port", type=int, default=50051)
        g.add_argument("--tls-cert", default=None, help="PEM certificate chain (enables TLS)")
        g.add_argument("--tls-key", default=None, help="PEM private key")
    else:
        g.add_argument("--server", default="127.0.0.1:50051", help="host:port of `splitkernels serve`")
        g.add_argument("--tls-ca", default=None, help="PEM root certificate to trust (enables TLS)")
        g.add_argument("--server-name", default=None, help="name to check in the server certificate")
        g.add_argument("--timeout", type=float, default=600.0, help="deadline of the session, seconds")
    g.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"shared token (default ${TOKEN_ENV})")
    g.add_argument("--max-message-mb", type=float, default=64.0)


def _with_link(transport: Transport, args: argparse.Namespace) -> Transport:
    if args.bandwidth_mbps is None:
        return transport
    return LinkEmulator(transport, args.bandwidth_mbps * 1e6, args.rtt_ms / 1000.0)


def _generate(sm: SplitModel, loaded: LoadedModel, transport: Transport, args: argparse.Namespace):
    ids = loaded.encode_prompt(args.prompt)
    # Warm-up: the channel's connection and the first calls of each kernel would otherwise be
    # billed to the measured TTFT.
    sm.run(ids, 2, transport=transport)
    result = sm.run(ids, args.max_new_tokens, args.do_sample, args.temperature, args.top_k, args.top_p,
                    loaded.eos_token_id, args.sample_seed, transport=transport)
    return ids, result


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.2f} ms"


def _print_report(report: dict) -> None:
    s = report["generation"]
    print(f"model:    {report['model']}, split after layer {report['split_layer']} of {report['num_layers']}")
    opsc = report["opsc"] or {}
    sides = [f"{side} {c['bits']}-bit g{c['group_size']}" for side, c in opsc.items() if c]
    print(f"codec:    {report['codec_text']}; OPSC weights: {', '.join(sides) or 'dense'}")
    print(f"link:     {report['transport']}")
    print(f"prompt:   {report['prompt']!r}")
    print(f"output:   {report['text']!r}")
    print(f"wire:     {s['bytes_per_token']:.1f} bytes/token vs {s['fp16_bytes_per_token']} fp16 "
          f"({s['compression_vs_fp16']:.2f}x smaller); {s['bits_per_element_decode']:.2f} bits/element per "
          f"token, {s['bits_per_element_prefill']:.2f} for the {s['prompt_tokens']}-token prefill frame")
    d = s["decode_mean"]
    print(f"latency:  (warm) TTFT {_ms(s['ttft_s'])}, per token {_ms(s['per_token_s'])} "
          f"({s['tokens_per_s']:.1f} tokens/s); per token: edge compute {_ms(d['edge_compute_s'])}, "
          f"encode {_ms(d['encode_s'])}, link {_ms(d['link_s'])}, decode {_ms(d['decode_s'])}, "
          f"server compute {_ms(d['server_compute_s'])}")
    q = report.get("quality")
    if q:
        print(f"quality:  split+codec vs unsplit on {q['text']} ({q['tokens']} scored tokens): perplexity "
              f"{q['ppl_reference']:.3f} -> {q['ppl_candidate']:.3f} ({100 * q['ppl_change']:+.2f}%), "
              f"KL {q['kl']:.5f} nats, top-1 agreement {100 * q['top1_agreement']:.1f}%")
    srv = report.get("server")
    if srv:
        print(f"server:   weights {srv['weight_bytes'] / 2**20:.1f} MiB, KV {srv['kv_bytes_per_token']} bytes/token, "
              f"process RSS {srv['rss_bytes'] / 2**20:.0f} MiB")
    if report.get("note"):
        print(f"note:     {report['note']}")


def _codec_text(codec: CodecConfig) -> str:
    if codec.mode == "passthrough":
        return "lossless passthrough"
    target = f"eps {codec.eps}" if codec.mode == "error" else f"budget {codec.avg_bits} bits/element"
    return f"TS+TAB-Q, alpha {codec.alpha}, capacity {codec.capacity}, {target}, widths {list(codec.bit_choices)}"


def _base_report(loaded: LoadedModel, sm: SplitModel, args: argparse.Namespace, transport_text: str,
                 ids: torch.Tensor, result) -> dict:
    opsc = _opsc_from_args(args, "both")
    return {
        "model": loaded.name,
        "num_layers": sm.adapter.num_layers,
        "split_layer": sm.split_layer,
        "codec": sm.codec.to_dict(),
        "codec_text": _codec_text(sm.codec),
        "opsc": None if opsc is None else {k: (c.to_dict() if c else None) for k, c in zip(("front", "back"), opsc)},
        "transport": transport_text,
        "prompt": args.prompt,
        "prompt_tokens": int(ids.shape[1]),
        "tokens": result.new_tokens,
        "text": loaded.decode(result.new_tokens),
        "generation": result.metrics.summary(),
        "note": loaded.note,
    }


def _cmd_serve(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, args.family, args.seed)
    sm = split_model(loaded.model, _split_layer(args, loaded), opsc=_opsc_from_args(args, "server"),
                     limits=Limits(args.max_sessions, args.max_seq_len, args.idle_timeout))
    sm.release("edge")
    tls = TlsFiles.from_paths(args.tls_cert, args.tls_key) if args.tls_cert else None
    server = GrpcServer(sm.manager, args.host, args.port, token=args.token, tls=tls,
                        max_message_bytes=int(args.max_message_mb * 2**20),
                        info={"model": loaded.name, "split_layer": sm.split_layer,
                              "hidden_size": sm.adapter.hidden_size}).start()
    print(f"serving {loaded.name}, layers {sm.split_layer + 1}..{sm.adapter.num_layers} + head, on "
          f"{server.address} ({'TLS' if tls else 'plaintext'}, {'token' if args.token else 'no'} auth)", flush=True)
    if loaded.note:
        print(f"note: {loaded.note}", flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def _cmd_edge(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, args.family, args.seed)
    sm = split_model(loaded.model, _split_layer(args, loaded), codec=_codec_from_args(args),
                     opsc=_opsc_from_args(args, "edge"))
    sm.release("server")
    tls = TlsFiles.from_paths(ca=args.tls_ca) if args.tls_ca else None
    grpc_transport = GrpcTransport(args.server, token=args.token, tls=tls, timeout_s=args.timeout,
                                   max_message_bytes=int(args.max_message_mb * 2**20), server_name=args.server_name)
    try:
        ids, result = _generate(sm, loaded, _with_link(grpc_transport, args), args)
        report = _base_report(loaded, sm, args, f"gRPC to {args.server}", ids, result)
        report["server"] = grpc_transport.info()
    finally:
        grpc_transport.close()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..eval import compare, load_text

    t_start = time.perf_counter()
    loaded = load_model(args.model, args.family, args.seed)
    if loaded.note and not args.json:
        print(f"note: {loaded.note}", file=sys.stderr)
    split = _split_layer(args, loaded)
    opsc = _opsc_from_args(args, "both")
    # OPSC quantises in place: keep an untouched copy as the quality reference.
    reference = load_model(args.model, args.family, args.seed).model if opsc else loaded.model
    sm = split_model(loaded.model, split, codec=_codec_from_args(args), opsc=opsc,
                     limits=Limits(max_sessions=4, max_seq_len=4096))
    token = secrets.token_hex(16)
    server = GrpcServer(sm.manager, "127.0.0.1", 0, token=token,
                        info={"model": loaded.name, "split_layer": split, "hidden_size": sm.adapter.hidden_size})
    server.start()
    grpc_transport = GrpcTransport(server.address, token=token, timeout_s=600.0)
    try:
        ids, result = _generate(sm, loaded, _with_link(grpc_transport, args), args)
        link = f"gRPC on loopback {server.address} (token auth)"
        if args.bandwidth_mbps is not None:
            link += f" + emulated link {args.bandwidth_mbps} Mbit/s, RTT {args.rtt_ms} ms"
        report = _base_report(loaded, sm, args, link, ids, result)
        report["server"] = grpc_transport.info()
    finally:
        grpc_transport.close()
        server.stop()
    if args.eval_tokens > 1:
        text_ids = loaded.encode_text(load_text("botchan"))[0, : args.eval_tokens]
        n = int(text_ids.shape[0])
        quality = compare(reference, sm, text_ids, context=n, stride=n)
        report["quality"] = {"text": "Botchan", **quality.to_dict()}
    report["wall_s"] = time.perf_counter() - t_start
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
        print(f"total:    {report['wall_s']:.1f} s")
    return 0


def register(subparsers) -> None:
    """Add ``serve``, ``edge`` and ``demo`` to the ``splitkernels`` command."""
    p = subparsers.add_parser("serve", help="run the server half (layers l+1..L + head) behind gRPC")
    _add_model_args(p)
    p.add_argument("--back-bits", type=int, default=None, help="OPSC: server layers' weight bits (8), default dense")
    _add_connection_args(p, server=True)
    p.add_argument("--max-sessions", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--idle-timeout", type=float, default=300.0, help="seconds before an idle session is freed")
    p.set_defaults(func=_cmd_serve)

    p = subparsers.add_parser("edge", help="run the edge half and generate against `splitkernels serve`")
    _add_model_args(p)
    p.add_argument("--front-bits", type=int, default=None, help="OPSC: edge layers' weight bits (2/3/4/8)")
    _add_codec_args(p)
    _add_generation_args(p)
    _add_connection_args(p, server=False)
    p.set_defaults(func=_cmd_edge)

    p = subparsers.add_parser("demo", help="split generation over gRPC on loopback, with bytes, latency, quality")
    _add_model_args(p)
    p.add_argument("--front-bits", type=int, default=None, help="OPSC: edge layers' weight bits (2/3/4/8)")
    p.add_argument("--back-bits", type=int, default=None, help="OPSC: server layers' weight bits (8)")
    _add_codec_args(p)
    _add_generation_args(p)
    p.add_argument("--eval-tokens", type=int, default=384,
                   help="Botchan tokens for perplexity/KL vs the unsplit model (0 = skip)")
    p.set_defaults(func=_cmd_demo)
