"""Codec v2 beside v1 and Atom-style: KL to the unsplit logits and perplexity change vs bits/element.

    python bench/e2e/codec_v2.py --out DIR [--model smollm2|gemma3|PATH] [--massive 1000] [--layers 4 10 15 22]

For each split layer: hidden states and the diagonal Fisher of the split hidden state are measured
on calibration windows (prose -- Botchan tokens disjoint from the evaluation tokens --, Python
source and Python's reference docs, as the CLI calibrates; ``--calib-text botchan``: prose only), v2 configs are
calibrated at several bit targets, and every codec is scored on the evaluation windows. Bits per
element are given for 512-token frames (one frame per window) and for one-token decode frames
(every token in its own frame: header, bitmap/per-token fields and CRC counted each time). v1 and
v2 code each token independently of the others in its frame, so one reconstruction serves both
frame sizes. ``--model gemma3`` scores Gemma 3 270M, a family the codec was not tuned on, whose
residual stream carries massive activations of its own (one channel near 1e5 in middle layers).
``--massive F`` runs the massive-activation fixture (bench/e2e/massive.py) on SmolLM2 instead. The
wire is fp16 where a split layer's calibration hidden state fits it, else fp32 (the massive fixture
sends bf16, as a bf16 edge would).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import atom_transfer
from common import CONTEXT, SPLIT_LAYERS
from massive import massive_channel_copy

from splitkernels.cli.models import wire_dtype_for
from splitkernels.codec import CodecConfig, calibrate, decode, decode_frame, encode, from_bytes
from splitkernels.codec.frame import frame_nbytes
from splitkernels.codec.frame_v2 import FRAME_CODERS
from splitkernels.codec.measured import calibrate_measured
from splitkernels.codec.predict import embedding_table
from splitkernels.codec.rate import RateControl, policy_of
from splitkernels.codec.sensitivity import fisher_diagonal
from splitkernels.eval import load_text
from splitkernels.eval.calibration_text import calibration_windows
from splitkernels.models import PACKAGED, load_model
from splitkernels.planner.quality import SplitEvaluator, TransferResult

CALIB_OFFSET = 8192  # calibration tokens start here; evaluation uses the first --tokens tokens
MASSIVE_CHANNEL = 247  # SmolLM2's heaviest channel (consistent sign, ~10x rms at layer 10)


class Recorder:
    """A transform that also keeps the one-token-frame byte count of every window it saw, and
    (under rate control) the windows as the one-token frames reconstruct them and the frames' scales."""

    def __init__(self, fn) -> None:
        self.fn, self.decode_bytes, self.elements, self.coder_bytes = fn, 0, 0, {}
        self.token_windows: list[torch.Tensor] = []
        self.scales: list[int] = []

    def __call__(self, x: torch.Tensor) -> TransferResult:
        res, per_token, by_coder, *rated = self.fn(x)
        self.decode_bytes += per_token
        self.elements += x.numel()
        for coder, n in by_coder.items():
            self.coder_bytes[coder] = self.coder_bytes.get(coder, 0) + n
        if rated:
            self.token_windows.append(rated[0])
            self.scales += rated[1]
        return res

    def replay(self):
        """A transform giving back, window by window, the one-token frames' reconstructions."""
        windows = iter(self.token_windows)
        return lambda x: TransferResult(next(windows).to(x.dtype), 0, 0.0, 0)


def v2_transform(cfg, wire: torch.dtype, tokens, embedding: torch.Tensor, coder: str | None = None,
                 also: tuple[str, ...] = (), rated: bool = False):
    """The v2 round trip of each window; ``tokens()`` gives the window's ids (a config with a
    prediction sends them, and ``embedding`` is the model's input table). ``coder``: the symbol
    coder of the 512-token frames (one-token frames always take rANS); ``also``: other coders whose
    512-token frame bytes are recorded beside it. ``rated``: every window is a session under the
    config's rate policy (splitkernels.codec.rate): its 512-token frame, then each token in its own
    frame, as an edge sends them; the score is of the 512-token frame's reconstruction, and the
    one-token frames' reconstruction is kept for a second score."""
    def run(x: torch.Tensor):
        xw = x.to(wire)
        ids = tokens()
        if rated:
            return run_rated(xw, ids, x.dtype)
        enc = encode(xw, cfg, start=0, tokens=ids, embedding=embedding)  # every window starts a sequence
        y = decode(enc, embedding=embedding).to(x.dtype)
        per_token = sum(encode(xw[t : t + 1], cfg, start=t, tokens=ids[t : t + 1], embedding=embedding).nbytes
                        for t in range(x.shape[0]))
        others = {c: len(enc.to_bytes(c)) for c in also}
        return TransferResult(y, len(enc.to_bytes(coder)), 0.0, int(enc.escapes.numel())), per_token, others

    def run_rated(xw: torch.Tensor, ids, dtype: torch.dtype):
        rate = RateControl(cfg, policy_of(cfg))
        frame = rate.encode_frame(xw, coder, 0, ids, embedding)
        enc = from_bytes(frame, config=cfg)
        y = decode(enc, embedding=embedding).to(dtype)
        others = {c: len(enc.to_bytes(c)) for c in also}  # at the scale the primary coder's control chose
        frames = [rate.encode_frame(xw[t : t + 1], None, t, ids[t : t + 1], embedding) for t in range(xw.shape[0])]
        y1 = torch.cat([decode_frame(f, config=cfg, embedding=embedding).to(dtype) for f in frames])
        escapes = int(enc.escapes.numel())
        return TransferResult(y, len(frame), 0.0, escapes), sum(map(len, frames)), others, y1, rate.scales
    return run


def v1_transform(cfg: CodecConfig, wire: torch.dtype):
    def run(x: torch.Tensor):
        enc = encode(x.to(wire), cfg)
        y = decode(enc).to(x.dtype)
        per_token = sum(frame_nbytes(1, x.shape[1], wire, int(c), int(b))
                        for c, b in zip(enc.num_outliers.tolist(), enc.code_bytes.tolist()))
        return TransferResult(y, enc.nbytes, float(enc.token_bits.double().sum()), int(enc.num_outliers.sum())), per_token, {}
    return run


def atom(wire: torch.dtype):
    def run(x: torch.Tensor):
        res = atom_transfer(x.to(wire).float())
        # One-token frames: the per-token bytes plus the channel list (u16 each), which every frame carries.
        per_token = res.nbytes + x.shape[0] * 2 * min(16, x.shape[1])
        return TransferResult(res.x_hat.to(x.dtype), res.nbytes, res.code_bits, 0), per_token, {}
    return run


def default_layers(num_layers: int) -> list[int]:
    """SPLIT_LAYERS on SmolLM2's 30 layers, else the same fractions of depth."""
    return sorted({max(1, min(num_layers - 1, round(layer * num_layers / 30))) for layer in SPLIT_LAYERS})


def wire_dtypes(model, calib: torch.Tensor, layers: list[int]) -> dict[int, torch.dtype]:
    """Per split layer, what the CLI's edge sends (:func:`splitkernels.cli.models.wire_dtype_for`):
    fp16 where the calibration hidden state fits it with a 2x margin, else the fp32 model's own."""
    return {layer: wire_dtype_for(model, layer, calib[0]) for layer in layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (results.json, table.md)")
    ap.add_argument("--model", default="smollm2",
                    help=f"{' or '.join(sorted(PACKAGED))} (packaged real models), or the path of a model folder "
                         "(save_pretrained) or .gguf file: a family the defaults were never tuned on")
    ap.add_argument("--layers", type=int, nargs="*", default=None,
                    help=f"split layers (default: {' '.join(map(str, SPLIT_LAYERS))} on SmolLM2, the same depth "
                         "fractions on another model)")
    ap.add_argument("--tokens", type=int, default=1024, help="evaluation tokens (windows of 512)")
    ap.add_argument("--eval-file", default=None,
                    help="score this UTF-8 text file instead of Botchan's first tokens (the calibration text is "
                         "unchanged): a text the calibration did not see")
    ap.add_argument("--calib-tokens", type=int, default=1536)
    ap.add_argument("--calib-text", choices=("mixed", "botchan"), default="mixed",
                    help="calibration windows: prose (Botchan), Python source and Python's reference docs in turn, as "
                         "the CLI calibrates (splitkernels.eval.calibration_text), or Botchan only")
    ap.add_argument("--bits", nargs="*", default=["measured", "default", "3.5", "4.0", "4.5"],
                    help="v2 bit targets; 'default' is calibrate's own rule (KL proxy within a decode-frame ceiling), "
                         "'measured' the CLI's (that KL target as measured through the model on the calibration windows)")
    ap.add_argument("--uniform-bits", type=float, nargs="*", default=[4.0],
                    help="v2 bit targets calibrated without the Fisher (uniform channel scales)")
    ap.add_argument("--compare-positions", action="store_true",
                    help="also score every Fisher target without position shifts (one step for every position)")
    ap.add_argument("--massive", type=float, default=None, help="massive-activation fixture: channel factor")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--coder", choices=FRAME_CODERS, default=None,
                    help="symbol coder of the v2 512-token frames (default rans, the fewest bytes)")
    ap.add_argument("--also-coders", nargs="*", choices=FRAME_CODERS, default=[],
                    help="with --bits measured: also record the 512-token frame bits of these coders (bits_512_by_coder)")
    ap.add_argument("--no-rate", action="store_true",
                    help="the measured rule's frames at the calibrated step (no per-frame rate control)")
    ap.add_argument("--no-prediction", action="store_true",
                    help="the measured rule without the token prediction (calibrate_measured(predict=False))")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if args.model not in PACKAGED and not Path(args.model).exists():
        ap.error(f"--model must be one of {sorted(PACKAGED)} or an existing model folder or .gguf file, got {args.model!r}")
    loaded = load_model(args.model)
    if loaded.tokenizer is None:
        ap.error(f"--model {args.model!r} has no tokenizer: the harness scores real text")
    model, tok = loaded.model, loaded.tokenizer
    if args.massive:
        if args.model != "smollm2":
            ap.error("--massive is a SmolLM2 fixture (its channel 247)")
        massive_channel_copy(model, MASSIVE_CHANNEL, args.massive)
    model.eval()
    layers = args.layers or default_layers(model.config.num_hidden_layers)
    ids = tok(load_text("botchan"), return_tensors="pt").input_ids[0]
    if args.calib_text == "mixed":
        calib, calib_used = calibration_windows(lambda t: tok(t, return_tensors="pt").input_ids[0], args.calib_tokens,
                                                CONTEXT, prose_start=CALIB_OFFSET)
    else:
        calib = ids[CALIB_OFFSET : CALIB_OFFSET + args.calib_tokens].reshape(-1, CONTEXT)
        calib_used = {"prose": [CALIB_OFFSET, args.calib_tokens]}
    wires = wire_dtypes(model, calib, layers)
    if args.massive:
        wires = dict.fromkeys(layers, torch.bfloat16)  # the fixture's published rows: a bf16 edge
    t0 = time.time()
    scored = ids if args.eval_file is None else \
        tok(Path(args.eval_file).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    with torch.no_grad():
        ev = SplitEvaluator(model, scored[: args.tokens], CONTEXT)
    results = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "eval_text": args.eval_file or "botchan", "calibration": calib_used, "model": loaded.name + (f" massive ch{MASSIVE_CHANNEL} x{args.massive:g}" if args.massive else ""),
               "wire": {layer: str(w) for layer, w in wires.items()}, "tokens": ev.tokens, "ppl_reference": ev.ppl_reference, "rows": []}

    table = embedding_table(model)
    window_ids = lambda: ev.current_ids  # noqa: E731 - the window being sent

    def record(layer: int, name: str, fn, extra: dict | None = None) -> None:
        rec = Recorder(fn)
        with torch.no_grad():
            p = ev.measure(layer, None, None, None, rec)
        if rec.coder_bytes:
            extra = {**(extra or {}), "bits_512_by_coder": {c: 8.0 * n / rec.elements for c, n in rec.coder_bytes.items()}}
        if rec.token_windows:  # the one-token frames' own reconstruction, scored the same way
            with torch.no_grad():
                p1 = ev.measure(layer, None, None, None, rec.replay())
            scales = torch.tensor(rec.scales, dtype=torch.float64)
            extra = {**(extra or {}), "kl_1": p1.kl, "ppl_change_1": p1.ppl_change,
                     "scales": {"mean": float(scales.mean()), "min": int(scales.min()), "max": int(scales.max())}}
        row = {"layer": layer, "codec": name, "bits_512": p.bits_per_element,
               "bits_1": 8.0 * rec.decode_bytes / rec.elements, "kl": p.kl, "ppl_change": p.ppl_change,
               "top1": p.top1_agreement, **(extra or {})}
        results["rows"].append(row)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        others = " ".join(f"{c}={b:.3f}" for c, b in row.get("bits_512_by_coder", {}).items())
        decode_frames = (f" kl1={row['kl_1']:.4f} ppl1={row['ppl_change_1'] * 100:+.2f}% scale={row['scales']['mean']:+.2f}"
                         if "kl_1" in row else "")
        print(f"[{time.time() - t0:5.0f}s] l={layer:2d} {name:28s} bits512={row['bits_512']:.3f} "
              f"bits1={row['bits_1']:.3f} kl={p.kl:.4f} ppl={p.ppl_change * 100:+.2f}%{decode_frames} {others}", flush=True)

    for layer in layers:
        wire = wires[layer]
        fisher = fisher_diagonal(model, calib, layer)
        for b in args.bits:
            if b == "measured":
                cfg = calibrate_measured(model, list(calib), layer, fisher, wire_dtype=wire, predict=not args.no_prediction)
                rated = not args.no_rate and policy_of(cfg) is not None
                record(layer, "v2 fisher measured" + (" predicted" if cfg.prediction else "")
                       + (f", {args.coder}" if args.coder else "") + (", rate control" if rated else ""),
                       v2_transform(cfg, wire, window_ids, table, args.coder, tuple(args.also_coders), rated),
                       {"info": cfg.info})
                continue
            for positions in (True, False) if args.compare_positions else (True,):
                cfg = calibrate(fisher.hidden, bits=None if b == "default" else float(b), sensitivity=fisher.channel,
                                position_sensitivity=fisher.position if positions else None, wire_dtype=wire)
                name = f"v2 fisher {b if b == 'default' else f'{float(b):g}'}{'' if positions else ', no position shifts'}"
                record(layer, name, v2_transform(cfg, wire, window_ids, table), {"info": cfg.info})
        for b in args.uniform_bits:
            cfg = calibrate(fisher.hidden, bits=b, wire_dtype=wire)
            record(layer, f"v2 uniform {b:g}", v2_transform(cfg, wire, window_ids, table), {"info": cfg.info})
        if not args.no_baselines:
            record(layer, "v1 eps 0.22", v1_transform(CodecConfig(eps=0.22), wire))
            record(layer, "Atom-style 4-bit g32", atom(wire))
    lines = [f"# codec v2 vs v1 vs Atom-style: {results['model']}, {ev.tokens} scored tokens", "",
             "| layer | wire | codec | bits/elem 512-token frames | bits/elem 1-token frames | KL | ppl change | "
             "KL, 1-token frames | ppl change, 1-token frames |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['layer']} | {str(wires[r['layer']]).replace('torch.', '')} | {r['codec']} | {r['bits_512']:.3f} | {r['bits_1']:.3f} | {r['kl']:.4f} | "
                     f"{r['ppl_change'] * 100:+.2f}% | " + (f"{r['kl_1']:.4f} | {r['ppl_change_1'] * 100:+.2f}% |"
                                                             if "kl_1" in r else "| |"))
    (out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
