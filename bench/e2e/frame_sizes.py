"""The planner's codec v2 frame sizes against real frames, for short prompts and the first decode frame.

    python bench/e2e/frame_sizes.py --out DIR --model gemma3 --layer 2 [--prompt-file F ...]

Calibrates v2 as the CLI does (mixed calibration text, the default rule, Fisher scales and position
shifts), measures a calibration point's statistics the way the planner's table does (two 512-token
windows of Botchan), then encodes the split hidden state of real prompts of 6 to 128 tokens and of
the next token as a one-token decode frame at its own position. Each frame's size is printed beside
:func:`splitkernels.planner.costs.frame_bytes_v2`'s prediction from the point's statistics, both as
the planner counts now (code bits without the early positions' residuals, added per position) and
as it counted before (the window average, residuals included, for every position). Writes
``frame_sizes_<model>_<layer>.json`` and ``.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONTEXT  # noqa: E402

from splitkernels.cli.models import wire_dtype_for  # noqa: E402
from splitkernels.codec import calibrate, encode  # noqa: E402
from splitkernels.codec.frame_v2 import residual_bytes  # noqa: E402
from splitkernels.codec.sensitivity import fisher_diagonal, split_hidden_states  # noqa: E402
from splitkernels.eval import load_text  # noqa: E402
from splitkernels.eval.calibration_text import calibration_windows  # noqa: E402
from splitkernels.models import PACKAGED, load_packaged  # noqa: E402
from splitkernels.planner.costs import frame_bytes_v2  # noqa: E402
from splitkernels.planner.quality import v2_code_bits  # noqa: E402

PROMPT_TOKENS = (6, 16, 42, 128)
CALIB_OFFSET, CALIB_TOKENS = 8192, 1536


def point_statistics(model, tok, cfg, layer: int, wire: torch.dtype) -> dict:
    """Code bits per element (now: without residuals; before: with them) and escapes per token
    over two 512-token Botchan windows, as a calibration table point records them."""
    ids = tok(load_text("botchan"), return_tensors="pt").input_ids[0, : 2 * CONTEXT].reshape(2, CONTEXT)
    with torch.no_grad():
        states = split_hidden_states(model, list(ids), layer).reshape(2, CONTEXT, -1)
    d = states.shape[-1]
    now = before = escapes = 0.0
    for window in states:
        enc = encode(window.to(wire), cfg)
        nbytes = len(enc.to_bytes())
        bits = v2_code_bits(enc, nbytes)
        shifts = cfg.row_shifts(0, CONTEXT, enc.tokens)
        residual = residual_bytes(shifts, enc.raw.numpy()[: len(shifts)], d) if len(shifts) else 0
        now += bits
        before += bits + 8.0 * (residual + (1 if residual else 0)) / d  # residuals and the start varint
        escapes += enc.escapes.numel()
    rows = 2 * CONTEXT
    return dict(code_bits=now / rows, code_bits_before=before / rows, escapes_per_token=escapes / rows, hidden=d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", choices=sorted(PACKAGED), default="gemma3")
    ap.add_argument("--layer", type=int, default=2, help="split layer (1-based)")
    ap.add_argument("--prompt-file", type=Path, nargs="*", default=[],
                    help="UTF-8 texts whose first tokens are the prompts (besides Botchan from character 20000)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, tok = load_packaged(args.model)
    model.eval()

    def ids_of(text: str) -> torch.Tensor:
        return tok(text, return_tensors="pt").input_ids[0]

    calib, _ = calibration_windows(ids_of, CALIB_TOKENS, CONTEXT, prose_start=CALIB_OFFSET)
    wire = wire_dtype_for(model, args.layer, calib[0])
    fisher = fisher_diagonal(model, calib, args.layer)
    cfg = calibrate(fisher.hidden, bits=None, sensitivity=fisher.channel, position_sensitivity=fisher.position,
                    wire_dtype=wire)
    stats = point_statistics(model, tok, cfg, args.layer, wire)
    d, shifts = stats["hidden"], cfg.position_shift
    print(f"{args.model} split {args.layer}: wire {wire}, position shifts {shifts}, code bits {stats['code_bits']:.3f} "
          f"(before: {stats['code_bits_before']:.3f}), escapes/token {stats['escapes_per_token']:.2f}", flush=True)
    prompts = {"prose (Botchan)": load_text("botchan")[20000:24000]}
    prompts.update({f.name: f.read_text(encoding="utf-8")[:6000] for f in args.prompt_file})
    rows = []
    for name, text in prompts.items():
        ids = ids_of(text)
        for n in (n for n in PROMPT_TOKENS if n < len(ids)):
            with torch.no_grad():
                states = split_hidden_states(model, [ids[: n + 1]], args.layer).to(wire)
            row = dict(prompt=name, tokens=n,
                       prompt_frame=len(encode(states[:n], cfg).to_bytes()),
                       prompt_now=frame_bytes_v2(n, d, stats["code_bits"], stats["escapes_per_token"], wire,
                                                 position_shift=shifts),
                       prompt_before=frame_bytes_v2(n, d, stats["code_bits_before"], stats["escapes_per_token"], wire),
                       decode_frame=len(encode(states[n:], cfg, start=n).to_bytes()),
                       decode_now=frame_bytes_v2(1, d, stats["code_bits"], stats["escapes_per_token"], wire,
                                                 position_shift=shifts, start=n),
                       decode_before=frame_bytes_v2(1, d, stats["code_bits_before"], stats["escapes_per_token"], wire))
            rows.append(row)
            print(f"{name:24s} T={n:4d} prompt {row['prompt_frame']:6d} B, now {row['prompt_now']:6d}, before "
                  f"{row['prompt_before']:6d} | decode at {n}: {row['decode_frame']} B, now {row['decode_now']}, "
                  f"before {row['decode_before']}", flush=True)
    result = dict(model=PACKAGED[args.model].name, layer=args.layer, wire=str(wire), position_shift=shifts,
                  machine=platform.processor() or platform.machine(), **stats, rows=rows)
    stem = args.out / f"frame_sizes_{args.model}_{args.layer}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))

    def err(pred: int, real: int) -> str:
        return f"{pred} ({100 * (pred / real - 1):+.1f}%)"

    lines = [f"# Planned vs real codec v2 frames: {result['model']}, split {args.layer}", "",
             f"Position shifts {shifts}; code bits {stats['code_bits']:.3f} per element (before: "
             f"{stats['code_bits_before']:.3f}), {stats['escapes_per_token']:.2f} escapes per token.", "",
             "| prompt | T | prompt frame B | planned now | planned before | decode frame at T, B | planned now | "
             "planned before |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['prompt']} | {r['tokens']} | {r['prompt_frame']} | {err(r['prompt_now'], r['prompt_frame'])} | "
                     f"{err(r['prompt_before'], r['prompt_frame'])} | {r['decode_frame']} | "
                     f"{err(r['decode_now'], r['decode_frame'])} | {err(r['decode_before'], r['decode_frame'])} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
