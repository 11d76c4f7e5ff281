"""Speculative decoding across the split vs one token per round trip, on SmolLM2 over the link
emulator: tokens per second, acceptance, tokens per round trip, bytes per token and the
per-token latency breakdown, with every method's greedy output checked against the baseline's.

    python bench/speculative.py --out bench/out/speculative

Everything runs in this process (in-process server behind ``LinkEmulator``); by default the
emulator adds each exchange's link time (RTT + bytes at the bandwidth) to the measured times
instead of sleeping (``--sleep`` waits for real, so that the edge's drafting of the next round
during the round trip, on by default, overlaps the link as it would on a real one).
Writes ``speculative.json`` and ``speculative.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import splitkernels._C as _C
from splitkernels.codec import CodecConfig
from splitkernels.eval import load_text
from splitkernels.models import load_smollm2
from splitkernels.planner import Link, ModelShape, Roofline, get_device, split_latency
from splitkernels.planner.speculation import draft_model_option, round_costs
from splitkernels.runtime import LinkEmulator, split_model
from splitkernels.runtime.speculative import DRAFTERS, make_drafter, speculate

MODEL_EDGE, MODEL_SERVER = "jetson-orin-nano-8gb", "nvidia-a100-80gb"
DRAFT_GROUP = 32  # the draft model make_drafter builds


def prompts(tok) -> dict[str, torch.Tensor]:
    """Three kinds of prompt: prose to continue, an instruction to answer, code to edit."""

    def chat(text: str) -> torch.Tensor:
        return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"]

    prose = tok(load_text("botchan")[:600], return_tensors="pt").input_ids
    code = ("Add type hints and a docstring to this Python function, and return the whole function:\n\n"
            "def moving_average(values, window):\n"
            "    if window <= 0:\n"
            "        raise ValueError('window must be positive')\n"
            "    result = []\n"
            "    total = 0.0\n"
            "    for i, value in enumerate(values):\n"
            "        total += value\n"
            "        if i >= window:\n"
            "            total -= values[i - window]\n"
            "        if i >= window - 1:\n"
            "            result.append(total / window)\n"
            "    return result\n")
    return {
        "prose continuation": prose,
        "instruction answer": chat("Explain how a hash table works and how it handles collisions."),
        "code edit": chat(code),
    }


_drafters: dict = {}


def one(sm, ids, new, link, method, eos, draft_bits=4, overlap=True):
    if method == "one token per round trip":
        result = sm.run(ids, new, transport=link, eos_token_id=eos)
        s = result.metrics.summary()
        per_token = dict(s["decode_mean"])
        decode_tokens = s["generated_tokens"] - 1
        row = dict(tokens_per_s=s["tokens_per_s"], per_token=per_token, tokens_per_round_trip=1.0,
                   acceptance_rate=None, bytes_per_token=s["bytes_per_token"],
                   wire_bytes_per_token=sum(x.bytes_up + x.bytes_down for x in result.metrics.steps[1:])
                   / max(decode_tokens, 1))
    else:
        name, k = method.split(" k=")
        if name not in _drafters:  # built once: a draft model is a quantised copy of the model
            _drafters[name] = make_drafter(name, sm.edge, draft_bits)
        result = speculate(sm, ids, new, drafter=_drafters[name], k=None if k == "adaptive" else int(k),
                           transport=link, eos_token_id=eos, overlap=overlap)
        s = result.metrics.summary()
        row = {key: s[key] for key in ("tokens_per_s", "per_token", "tokens_per_round_trip", "acceptance_rate",
                                       "bytes_per_token", "wire_bytes_per_token")}
        row["drafts_per_round"] = s["drafted"] / max(s["steps"] - 1, 1)
    row.setdefault("drafts_per_round", 0.0)
    row.update(generated=s["generated_tokens"], total_s=s["total_s"], ttft_s=s["ttft_s"],
               end_to_end_tokens_per_s=s["generated_tokens"] / s["total_s"])
    return result.sequences, row


def modelled_token_s(shape: ModelShape, split: int, rtt_ms: float, mbps: float, prompt_tokens: int, row: dict,
                     method: str, draft_bits: int) -> float:
    """Seconds per token on a modelled edge board + server GPU (the planner's rooflines, fp16
    frames) with this row's measured drafts and tokens per round trip."""
    edge, server = Roofline(get_device(MODEL_EDGE), shape), Roofline(get_device(MODEL_SERVER), shape)
    lat = split_latency(shape, edge, server, Link(mbps, rtt_ms), split, None, None, 2 * shape.hidden,
                        2 * shape.hidden * prompt_tokens, prompt_tokens, prompt_tokens + 64)
    fixed, per_draft = round_costs(lat)
    # Upper bounds for a chain: as if every draft came from its costlier member.
    if "early-exit" in method:  # the head on the edge once per draft
        per_draft += edge.head_s(1)
    if "draft-model" in method:  # a low-bit copy of every layer and the head on the edge per draft
        per_draft += draft_model_option(shape, edge, draft_bits, 1.0, prompt_tokens + 64, DRAFT_GROUP).draft_s
    return (fixed + row["drafts_per_round"] * per_draft) / row["tokens_per_round_trip"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--split-layer", type=int, default=15)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rtt-ms", type=float, nargs="+", default=[20.0, 50.0])
    ap.add_argument("--mbps", type=float, default=100.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 behaves best on a shared CPU)")
    ap.add_argument("--methods", nargs="+", default=["lookup k=adaptive", "lookup+early-exit k=adaptive",
                                                     "lookup+draft-model k=adaptive"],
                    help=f"DRAFTER k=N|adaptive, DRAFTER one of {', '.join(DRAFTERS)}")
    ap.add_argument("--draft-bits", type=int, default=4,
                    help="bits of the draft model's copy of the weights (SmolLM2 ships as 4-bit g32, so a 4-bit "
                         "g32 copy is nearly the model itself: 3 shows a real quantiser's disagreement)")
    ap.add_argument("--sleep", action="store_true",
                    help="really wait for the emulated link (then drafting during the round trip overlaps it)")
    ap.add_argument("--no-overlap", dest="overlap", action="store_false",
                    help="draft only after each reply (default: draft the next round during the round trip)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    _C.set_num_threads(args.threads)  # the native decode steps (edge, server and draft model)
    model, tok = load_smollm2()
    sm = split_model(model, args.split_layer, codec=CodecConfig.passthrough())
    eos = tok.eos_token_id
    shape = ModelShape.from_config(model.config, name="SmolLM2-135M-Instruct")
    methods = ["one token per round trip", *args.methods]
    cases = prompts(tok)
    rows = []
    samples: dict[str, str] = {}
    t_start = time.time()
    for rtt in args.rtt_ms:
        link = LinkEmulator(sm.transport, bandwidth_bps=args.mbps * 1e6, rtt_s=rtt / 1e3, sleep=args.sleep)
        for kind, ids in cases.items():
            for method in methods:  # warm-up
                one(sm, ids, 4, link, method, eos, args.draft_bits, args.overlap)
            runs: dict[str, list[dict]] = {m: [] for m in methods}
            outputs: dict[str, torch.Tensor] = {}
            for _ in range(args.repeats):
                for method in methods:  # interleaved, so load changes hit every method alike
                    seqs, row = one(sm, ids, args.new_tokens, link, method, eos, args.draft_bits, args.overlap)
                    runs[method].append(row)
                    outputs.setdefault(method, seqs)
                    if not torch.equal(seqs, outputs[method]):
                        raise RuntimeError(f"{method} gave different outputs on repeated greedy runs")
            base = outputs[methods[0]]
            samples[kind] = tok.decode(base[0, ids.shape[1]:])
            base_tps = statistics.median(r["tokens_per_s"] for r in runs[methods[0]])
            modelled_base = None
            for method in methods:
                # The run at the (lower) median speaks for the method; tokens/s is the true median.
                med = dict(sorted(runs[method], key=lambda r: r["tokens_per_s"])[(len(runs[method]) - 1) // 2])
                med["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in runs[method])
                model_s = modelled_token_s(shape, args.split_layer, rtt, args.mbps, ids.shape[1], med,
                                           method, args.draft_bits)
                modelled_base = modelled_base or model_s
                rows.append(dict(modelled_tokens_per_s=1 / model_s, modelled_speedup=modelled_base / model_s,rtt_ms=rtt, mbps=args.mbps, prompt=kind, prompt_tokens=ids.shape[1], method=method,
                                 identical_to_baseline=bool(torch.equal(outputs[method], base)),
                                 speedup=med["tokens_per_s"] / base_tps,
                                 tokens_per_s_runs=[r["tokens_per_s"] for r in runs[method]], **med))
                print(f"[{time.time() - t_start:5.0f}s] RTT {rtt:g} ms, {kind}: {method}: "
                      f"{med['tokens_per_s']:.1f} tok/s ({rows[-1]['speedup']:.2f}x), identical "
                      f"{rows[-1]['identical_to_baseline']}", flush=True)
    out = dict(model="SmolLM2-135M-Instruct (fp32)", split_layer=args.split_layer, draft_bits=args.draft_bits,
               overlap=args.overlap, codec="lossless (passthrough)",
               new_tokens=args.new_tokens, repeats=args.repeats, link="emulated, " +
               ("sleeping" if args.sleep else "delay added to the measured times"),
               machine=f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs), torch "
                       f"{torch.__version__}, {torch.get_num_threads()} threads",
               load_average_at_end=os.getloadavg(), rows=rows, outputs=samples)
    (args.out / "speculative.json").write_text(json.dumps(out, indent=1))
    (args.out / "speculative.md").write_text(table(out))
    print(table(out))
    return 0


def table(out: dict) -> str:
    lines = [f"Speculative decoding across the split: {out['model']}, split after layer {out['split_layer']}, "
             f"{out['codec']} codec, {out['new_tokens']} new tokens (greedy, stops at EOS), draft model "
             f"{out.get('draft_bits', 4)}-bit g32 copy of the model, drafting "
             f"{'during the round trip' if out.get('overlap', False) else 'after each reply'}, median of "
             f"{out['repeats']}; link {out['link']}; {out['machine']}; load average at the end "
             f"{', '.join(f'{x:.1f}' for x in out['load_average_at_end'])}.", "",
             "Per-token times are means over the decode rounds (ms per generated token). *Modelled*: the "
             f"same drafts per round and tokens per round trip on a {MODEL_EDGE} edge and {MODEL_SERVER} "
             "server (planner rooflines, fp16 frames, `planner.speculation.round_costs`).", "",
             "| RTT ms | prompt | method | tok/s | speed-up | same output | tokens/RTT | drafts/round | accept | "
             "bytes/token | edge | draft | encode | link | decode | server | modelled tok/s | modelled speed-up |",
             "|---:|---|---|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out["rows"]:
        p = r["per_token"]
        ms = [1e3 * p.get(k, 0.0) for k in ("edge_compute_s", "draft_s", "encode_s", "link_s", "decode_s",
                                            "server_compute_s")]
        acc = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        lines.append(f"| {r['rtt_ms']:g} | {r['prompt']} | {r['method']} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {'yes' if r['identical_to_baseline'] else 'NO'} | "
                     f"{r['tokens_per_round_trip']:.2f} | {r['drafts_per_round']:.2f} | {acc} | "
                     f"{r['bytes_per_token']:.0f} | " + " | ".join(f"{x:.1f}" for x in ms)
                     + f" | {r['modelled_tokens_per_s']:.1f} | {r['modelled_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
