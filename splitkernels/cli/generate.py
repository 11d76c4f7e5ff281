"""``splitkernels edge`` (the edge half against a running ``serve``) and ``splitkernels demo``
(both halves over gRPC on loopback, with a report of bytes, latency and quality)."""
from __future__ import annotations

import argparse
import json
import secrets
import sys
import time

import torch

from ..codec import CodecConfig, CodecConfigV2
from ..runtime.protocol import SplitError
from . import args as types
from .common import add_connection_args, message_bytes
from .errors import UsageError, from_split_error
from .files import read_bytes
from .models import (LoadedModel, SplitSettings, add_codec_args, add_front_args, add_model_args, calibration_ids,
                     load_model, split_settings)

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--max-new-tokens", type=types.positive_int, default=24)
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--temperature", type=types.positive, default=1.0)
    g.add_argument("--top-k", type=types.non_negative_int, default=0)
    g.add_argument("--top-p", type=types.number(0.0, 1.0, low_open=True), default=1.0)
    g.add_argument("--sample-seed", type=types.integer(-2**63, 2**63 - 1), default=None)
    g.add_argument("--bandwidth-mbps", type=types.positive, default=None, help="emulate a link of this bandwidth")
    g.add_argument("--rtt-ms", type=types.non_negative, default=0.0, help="emulated round-trip time (with --bandwidth-mbps)")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    g.add_argument("--eager", action="store_true",
                   help="run every step through the model's own forward (default: the native decode path "
                        "where it covers the model)")


def _with_link(transport, args: argparse.Namespace):
    from ..runtime.link import LinkEmulator

    if args.bandwidth_mbps is None:
        return transport
    return LinkEmulator(transport, args.bandwidth_mbps * 1e6, args.rtt_ms / 1000.0)


def _generate(sm, loaded: LoadedModel, transport, args: argparse.Namespace):
    ids = loaded.encode_prompt(args.prompt)
    # Warm-up: the channel's connection and the first calls of each kernel would otherwise be
    # billed to the measured TTFT.
    sm.run(ids, 2, transport=transport)
    result = sm.run(ids, args.max_new_tokens, args.do_sample, args.temperature, args.top_k, args.top_p,
                    loaded.eos_token_id, args.sample_seed, transport=transport)
    return ids, result


def _warn_unmet_budget(codec: CodecConfig | CodecConfigV2, summary: dict) -> None:
    """A budget the frames did not meet (too few bits for the metadata) is said, not hidden."""
    if not isinstance(codec, CodecConfig) or codec.mode != "budget":
        return
    sent = summary["bits_per_element_decode"]
    if sent > codec.avg_bits * 1.02:
        print(f"warning: the budget of {codec.avg_bits:g} bits/element was not met: decode frames averaged "
              f"{sent:.2f} bits/element", file=sys.stderr)


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.2f} ms"


def _print_report(report: dict) -> None:
    s = report["generation"]
    print(f"model:    {report['model']}, split after layer {report['split_layer']} of {report['num_layers']}")
    opsc = report["opsc"] or {}
    sides = [f"{side} {c['bits']}-bit g{c['group_size']}" + (f" {c['method']}" if "method" in c else "")
             for side, c in opsc.items() if c]
    print(f"codec:    {report['codec_text']}; OPSC weights: {', '.join(sides) or 'dense'}")
    print(f"link:     {report['transport']}")
    print(f"decode:   edge {report['decode_path']['edge']}; server {report['decode_path'].get('server', 'remote')}")
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
    if report.get("resumed"):
        print(f"resumed:  {report['resumed']} time(s) after the stream broke")
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


_CODER_TEXT = {None: "static rANS", "rans": "static rANS", "auto": "static rANS, the Rice coder for long frames",
               "rice": "static rANS, the Rice coder for frames of several tokens",
               "planes": "static rANS, bit-plane Rice codes for frames of several tokens",
               "slots": "static rANS, per-channel slots for frames of several tokens", "nibble": "the nibble coder"}


def _codec_text(codec: CodecConfig | CodecConfigV2, calibration: dict | None, coder: str | None) -> str:
    if isinstance(codec, CodecConfigV2):
        c = calibration or {}
        texts = ", ".join(f"{kind} {n}" + (f" (Botchan from token {first}, disjoint from the evaluation text)"
                                           if kind == "prose" else "") for kind, (first, n) in c.get("texts", {}).items())
        how = (f", calibrated on {c['tokens']} tokens ({texts}) with {c['sensitivity']} sensitivity in "
               f"{c['seconds']:.1f} s") if c else ""
        info = codec.info
        if info.get("max_kl_proxy") is not None:
            if info.get("kl_target") is not None:
                rate = (f"rate for KL <= {info['kl_target']:g} as measured on the calibration windows (measured / "
                        f"Fisher estimate {info['kl_ratio']:.2f})")
            else:
                rate = f"rate for KL estimate <= {info['max_kl_proxy']:g} (got {info.get('kl_proxy', float('nan')):.4f})"
            if info.get("target_bits") is not None:
                rate += f" within {info['target_bits']:.2f} bits/element"
        else:
            rate = f"target {info.get('target_bits')} bits/element"
        return (f"v2 (calibrated equalisation + {_CODER_TEXT[coder]}, {max(1, len(codec.class_freqs))} channel classes), {rate}, "
                f"estimated {info.get('estimated_bits', float('nan')):.2f}, kmax {codec.kmax}{how}, config {codec.fingerprint[:8]}")
    if codec.mode == "passthrough":
        return "lossless passthrough"
    target = f"eps {codec.eps}" if codec.mode == "error" else f"budget {codec.avg_bits} bits/element"
    return f"TS+TAB-Q, alpha {codec.alpha}, capacity {codec.capacity}, {target}, widths {list(codec.bit_choices)}"


def _codec_report(codec: CodecConfig | CodecConfigV2, calibration: dict | None, coder: str | None) -> dict:
    """The codec as the report shows it: v1 settings, or v2's summary (its arrays stay out)."""
    if not isinstance(codec, CodecConfigV2):
        return codec.to_dict()
    return {"kind": "v2", "fingerprint": codec.fingerprint, "d": codec.d, "kmax": codec.kmax,
            "raw_limit": codec.raw_limit, "config_bytes": len(codec.canonical_bytes()), "calibration": calibration,
            "coder": coder or "rans", "info": codec.info}


def _base_report(loaded: LoadedModel, sm, settings: SplitSettings, args: argparse.Namespace, transport_text: str,
                 ids: torch.Tensor, result) -> dict:
    opsc = settings.opsc("both")
    return {
        "model": loaded.name,
        "num_layers": sm.adapter.num_layers,
        "split_layer": sm.split_layer,
        "codec": _codec_report(sm.codec, settings.calibration, settings.coder),
        "codec_text": _codec_text(sm.codec, settings.calibration, settings.coder),
        "opsc": None if opsc is None else {k: (c.to_dict() if c else None) for k, c in zip(("front", "back"), opsc)},
        "transport": transport_text,
        "prompt": args.prompt,
        "prompt_tokens": int(ids.shape[1]),
        "tokens": result.new_tokens,
        "text": loaded.decode(result.new_tokens),
        "generation": result.metrics.summary(),
        "decode_path": _decode_paths(sm),
        "note": loaded.note,
    }


def _decode_paths(sm) -> dict:
    """How each segment held here runs its one-token steps: native, or eager with the reason (and
    whether an eager server's LM head runs natively)."""
    out = {}
    for side in ("edge", "server"):
        segment = getattr(sm, side)
        if segment is None:
            continue
        out[side] = "native fast path" if segment.fast else f"eager ({segment.fast_reason})"
        if side == "server" and not segment.fast and segment.native_head is not None:
            out[side] += ", LM head native"
    return out


def _emit(report: dict, args: argparse.Namespace, codec: CodecConfig | CodecConfigV2) -> None:
    _warn_unmet_budget(codec, report["generation"])
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)


def _cmd_edge(args: argparse.Namespace) -> int:
    from ..runtime.grpc_transport import GrpcTransport, TlsFiles
    from ..runtime.resume import ResumingTransport, RetryPolicy
    from ..runtime.split_model import split_model

    tls = TlsFiles(root_certificates=read_bytes(args.tls_ca, "CA certificate (--tls-ca)")) if args.tls_ca else None
    loaded = load_model(args.model, args.family, args.seed)
    settings = split_settings(args, loaded)
    sm = split_model(settings.prepare(loaded.model), settings.split_config("edge"), fast=not args.eager,
                     calibration=calibration_ids(settings, "edge", args, loaded), side="edge")
    grpc_transport = GrpcTransport(args.server, token=args.token, tls=tls, timeout_s=args.timeout,
                                   max_message_bytes=message_bytes(args), server_name=args.server_name)
    resuming = ResumingTransport(grpc_transport, RetryPolicy(attempts=args.retries))
    try:
        ids, result = _generate(sm, loaded, _with_link(resuming, args), args)
        report = _base_report(loaded, sm, settings, args, f"gRPC to {args.server}", ids, result)
        report["resumed"] = resuming.resumes
        report["server"] = grpc_transport.info()
    except SplitError as exc:
        raise from_split_error(exc, args.server) from None
    finally:
        grpc_transport.close()
    _emit(report, args, settings.codec)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..eval import compare, load_text
    from ..runtime.grpc_transport import GrpcServer, GrpcTransport
    from ..runtime.sessions import Limits
    from ..runtime.split_model import split_model

    t_start = time.perf_counter()
    loaded = load_model(args.model, args.family, args.seed)
    if loaded.note and not args.json:
        print(f"note: {loaded.note}", file=sys.stderr)
    settings = split_settings(args, loaded)
    opsc = settings.opsc("both")
    # OPSC quantises in place: keep an untouched copy as the quality reference.
    reference = load_model(args.model, args.family, args.seed).model if opsc else loaded.model
    # A plan's maximum length is the server's limit (and must be one the model holds).
    max_seq_len = settings.max_seq_len or 4096
    sm = split_model(settings.prepare(loaded.model), settings.split_config("both"),
                     limits=Limits(max_sessions=4, max_seq_len=max_seq_len), fast=not args.eager,
                     calibration=calibration_ids(settings, "both", args, loaded))
    if settings.max_seq_len is not None and sm.manager.max_seq_len < max_seq_len:
        raise UsageError(f"--plan: max_seq_len {max_seq_len} is more positions than {loaded.name} holds "
                         f"({sm.manager.max_seq_len})")
    token = secrets.token_hex(16)
    server = GrpcServer(sm.manager, "127.0.0.1", 0, token=token,
                        info={"model": loaded.name, "split_layer": sm.split_layer,
                              "hidden_size": sm.adapter.hidden_size})
    server.start()
    grpc_transport = GrpcTransport(server.address, token=token, timeout_s=600.0)
    try:
        ids, result = _generate(sm, loaded, _with_link(grpc_transport, args), args)
        link = f"gRPC on loopback {server.address} (token auth)"
        if args.bandwidth_mbps is not None:
            link += f" + emulated link {args.bandwidth_mbps} Mbit/s, RTT {args.rtt_ms} ms"
        report = _base_report(loaded, sm, settings, args, link, ids, result)
        report["server"] = grpc_transport.info()
    except SplitError as exc:
        raise from_split_error(exc, server.address) from None
    finally:
        grpc_transport.close()
        server.stop()
    if args.eval_tokens > 1:
        text_ids = loaded.encode_text(load_text("botchan"))[0, : args.eval_tokens]
        n = int(text_ids.shape[0])
        quality = compare(reference, sm, text_ids, context=n, stride=n)
        report["quality"] = {"text": "Botchan", **quality.to_dict()}
    report["wall_s"] = time.perf_counter() - t_start
    _emit(report, args, settings.codec)
    if not args.json:
        print(f"total:    {report['wall_s']:.1f} s")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("edge", help="run the edge half and generate against `splitkernels serve`")
    add_model_args(p)
    add_front_args(p)
    add_codec_args(p)
    _add_generation_args(p)
    add_connection_args(p, server=False)
    p.add_argument("--retries", type=types.non_negative_int, default=3,
                   help="times to reopen the session (and replay its frames) when the stream breaks")
    p.set_defaults(func=_cmd_edge)

    p = subparsers.add_parser("demo", help="split generation over gRPC on loopback, with bytes, latency, quality")
    add_model_args(p)
    add_front_args(p)
    p.add_argument("--back-bits", type=int, choices=(2, 3, 4, 8), default=None,
                   help="OPSC: server layers' weight bits (8)")
    add_codec_args(p, default="v2")
    _add_generation_args(p)
    p.add_argument("--eval-tokens", type=types.non_negative_int, default=384,
                   help="Botchan tokens for perplexity/KL vs the unsplit model (0 = skip)")
    p.set_defaults(func=_cmd_demo)
