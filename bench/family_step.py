"""One decode step of a few decoder layers at real models' shapes: each family's own forward
against the native step (csrc/cpu/decode/), in the same run.

The layers are built from the family's transformers config at a real model's width (random
weights, vocabulary 1024), their linears 4-bit as OPSC stores them (group 128, or 64 where 128
does not divide the width), after a 32-token prompt. Per thread count, both paths run in blocks
of ``--steps`` tokens, each path in turn (``--blocks`` times), the first two steps of a block
warm-up: torch's OpenMP workers spin for a while after an eager forward and would take a core
from the native step's threads right after it. Medians of the rest. The eager path is the
decoder's forward (embedding, every layer, final norm); the native one the layers' step from the
embedding (python_tests/test_fastpath.py checks that the two agree).

Usage: python bench/family_step.py --out DIR [--families bloom,falcon] [--layers 2] [--threads 1,all]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402  (bench/timing.py)

import splitkernels._C as _C  # noqa: E402
from splitkernels.fastpath import NativeDecoder  # noqa: E402
from splitkernels.nn import replace_linear  # noqa: E402

VOCAB = 1024
# Each family at one real model's layer shape: (model named, its config fields).
SHAPES: dict[str, tuple[str, dict]] = {
    "gpt_neox": ("Pythia-1.4B", dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=16,
                                     rotary_pct=0.25, use_parallel_residual=True)),
    "persimmon": ("Persimmon-8B", dict(hidden_size=4096, intermediate_size=16384, num_attention_heads=64,
                                       qk_layernorm=True)),
    "opt": ("OPT-1.3B", dict(hidden_size=2048, ffn_dim=8192, num_attention_heads=32, word_embed_proj_dim=2048)),
    "bloom": ("BLOOM-1b7", dict(hidden_size=2048, n_head=16)),
    "mpt": ("MPT-7B", dict(d_model=4096, n_heads=32)),
    "falcon": ("Falcon-7B", dict(hidden_size=4544, num_attention_heads=71, multi_query=True, parallel_attn=True)),
    "gptj": ("GPT-J-6B", dict(n_embd=4096, n_head=16, rotary_dim=64)),
    "codegen": ("CodeGen-2B", dict(n_embd=2560, n_head=32, rotary_dim=64)),
    "xglm": ("XGLM-564M", dict(d_model=1024, attention_heads=16, ffn_dim=4096)),
}


def build(family: str, layers: int) -> torch.nn.Module:
    """The family's model at its SHAPES width with ``layers`` layers, linears 4-bit."""
    _, fields = SHAPES[family]
    config = AutoConfig.for_model(family, vocab_size=VOCAB, **fields)
    config.num_hidden_layers = layers  # each config maps the name to its own field (n_layer, ...)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    hidden = model.get_input_embeddings().weight.shape[1]
    replace_linear(model, bits=4, group_size=128 if hidden % 128 == 0 else 64, progress=False)  # head stays dense
    return model


def step_times(model: torch.nn.Module, layers: int, steps: int, blocks: int) -> dict[str, float]:
    """Median seconds of one token through the decoder's forward and through the native step."""
    decoder, embed = model.get_decoder(), model.get_input_embeddings()
    native = NativeDecoder(model, 0, layers)
    ids = torch.randint(0, VOCAB, (1, 32))
    times: dict[str, list[float]] = {"eager": [], "native": []}
    with torch.inference_mode():
        ref = decoder(input_ids=ids, use_cache=True).past_key_values
        fast = native.new_cache(lambda: type(ref)(config=model.config))
        decoder(input_ids=ids, cache=fast.dynamic(), use_cache=True)
        for _ in range(blocks):
            for path in ("eager", "native"):
                for step in range(steps):
                    tok = torch.randint(0, VOCAB, (1, 1))
                    start = time.perf_counter()
                    if path == "eager":
                        decoder(input_ids=tok, cache=ref, use_cache=True)
                    else:
                        native.step(native.embed(tok, fast.length)[0, 0], fast)
                    if step >= 2:
                        times[path].append(time.perf_counter() - start)
    return {path: statistics.median(t) for path, t in times.items()}


def table(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# One decode step of a few layers: the model's own forward against the native step", "",
        f"Command: `{result['command']}`", "",
        f"Machine: {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['logical_cpus']} logical CPUs, torch {m['torch']}, "
        f"kernel ISA {m.get('kernel_isa', '?')}; load average at start {m['loadavg_start'][0]:.1f}. "
        f"{result['layers']} layers, linears 4-bit, medians of {result['steps'] - 2} x {result['blocks']} steps per "
        "path (blocks of each path in turn).", "",
        "| family | shape of | threads | eager ms | native ms | eager / native |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['family']} | {r['model']} | {r['threads']} | {r['eager_ms']:.2f} | {r['native_ms']:.2f} "
                     f"| {r['eager_ms'] / r['native_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for family_step.json and .md")
    parser.add_argument("--families", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", default="1,all", help="comma-separated thread counts ('all': every CPU)")
    parser.add_argument("--steps", type=int, default=8, help="steps per block (the first two warm-up)")
    parser.add_argument("--blocks", type=int, default=3)
    args = parser.parse_args()
    families = args.families.split(",")
    unknown = [f for f in families if f not in SHAPES]
    if unknown:
        parser.error(f"unknown families {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    if args.layers < 1 or args.steps < 3 or args.blocks < 1:
        parser.error("--layers and --blocks must be >= 1 and --steps >= 3")
    try:
        threads = [os.cpu_count() if t == "all" else int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads must list counts or 'all', got {args.threads!r}")
    warnings.simplefilter("ignore")
    result = {"machine": timing.machine(), "command": "python " + " ".join(sys.argv), "layers": args.layers,
              "steps": args.steps, "blocks": args.blocks, "rows": []}
    for family in families:
        timing.progress(f"{family}: building {SHAPES[family][0]}'s layers")
        model = build(family, args.layers)
        for n in threads:
            torch.set_num_threads(n)
            _C.set_num_threads(n)
            t = step_times(model, args.layers, args.steps, args.blocks)
            result["rows"].append({"family": family, "model": SHAPES[family][0], "threads": n,
                                   "eager_ms": t["eager"] * 1e3, "native_ms": t["native"] * 1e3})
            timing.progress(f"  {n} thread(s): eager {t['eager'] * 1e3:.2f} ms, native {t['native'] * 1e3:.2f} ms")
        del model
    timing.write(args.out, "family_step", result, table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
