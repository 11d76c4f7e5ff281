"""Writes a GGUF file of random weights at any size, for the decode benchmarks at the layer shapes
of models that cannot be downloaded here: Llama's layer (``--arch llama``), Qwen 3's (per-head
query and key norms), Gemma 2's (sandwich norms, alternating sliding-window layers, soft-capped
attention scores and logits at Gemma 2's 50 and 30), StableLM 2's (LayerNorms with biases,
rotary over a quarter of each head, an LM head of its own), GPT-2's (learned position
embeddings instead of rotary, one qkv projection, biases everywhere, an MLP of four times the
width without a gate) or BLOOM's (GPT-2's layer with ALiBi instead of positions, a LayerNorm of
the token embeddings).

The file carries the tokenizer of the packaged SmolLM2 GGUF (so both llama.cpp and transformers
load it), ``--layers`` decoder layers of the given widths with weights drawn N(0, 0.02) and
quantised by gguf-py to ``--type`` (Q4_0 by default: the 4-bit format llama.cpp repacks for its
fastest x86 kernels), norms of ones (Gemma's files store 1 + w: its norms then scale by 1), and
the token embedding in Q8_0, tied to the LM head as in SmolLM2 (StableLM's own head: Q8_0 too).
Defaults are Llama-3-8B's layer: hidden 4096, MLP 14336, 32 query and 8 key/value heads of 128.

Usage: python bench/make_gguf.py --out FILE.gguf [--arch llama|qwen3|gemma2|stablelm|gpt2|bloom] [--layers 3]
       [--hidden 4096]
       [--intermediate 14336] [--heads 32] [--kv-heads 8] [--head-dim HIDDEN/HEADS] [--type q4_0|q4_1|q8_0]
then:  python bench/edge_decode.py --model FILE.gguf --out DIR
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_decode import gguf_file  # noqa: E402

TYPES = ("q4_0", "q4_1", "q8_0")
ARCHS = ("llama", "qwen3", "gemma2", "stablelm", "gpt2", "bloom")
BIASED = ("stablelm", "gpt2", "bloom")  # LayerNorms with a bias beside the weight
PLAIN = ("gpt2", "bloom")  # one qkv projection, biases on every projection, an MLP without a gate
GPT2_POSITIONS = 1024
STABLELM_ROTARY = 0.25  # of each head; transformers' GGUF loader reads no rotary width: its default
# transformers' GGUF loader reads no head width for Qwen 3: it keeps its config's default.
QWEN3_HEAD_DIM = 128
GEMMA2_WINDOW = 4096


def copy_tokenizer(reader, writer) -> int:
    """Copies every ``tokenizer.*`` field of ``reader`` into ``writer``; returns the vocabulary size."""
    import gguf

    vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        kind = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[1]) if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, kind, sub_type=sub)
        if key == "tokenizer.ggml.tokens":
            vocab = len(value)
    return vocab


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=None, help="query/key/value head width (default hidden / heads)")
    ap.add_argument("--arch", choices=ARCHS, default="llama")
    ap.add_argument("--type", choices=TYPES, default="q4_0")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    head_dim = args.head_dim or args.hidden // max(args.heads, 1)
    if min(args.hidden, args.intermediate, args.heads, args.kv_heads, head_dim) < 1 or args.layers < 2 \
            or args.heads % args.kv_heads or args.hidden % 32 or args.intermediate % 32 or head_dim % 32:
        sys.exit("need layers >= 2, positive sizes, kv-heads dividing heads, and widths and head widths that are "
                 "multiples of 32")
    if args.arch in PLAIN and (args.intermediate != 4 * args.hidden or args.kv_heads != args.heads
                               or head_dim * args.heads != args.hidden):
        sys.exit(f"--arch {args.arch} needs --intermediate 4 x hidden, --kv-heads = --heads and hidden = heads x "
                 "head width: transformers' model reads no other")
    if args.arch == "qwen3" and head_dim != QWEN3_HEAD_DIM:
        sys.exit(f"--arch qwen3 needs --head-dim {QWEN3_HEAD_DIM}: transformers' GGUF loader assumes it")
    import gguf

    qtype = gguf.GGMLQuantizationType[args.type.upper()]
    source = gguf.GGUFReader(str(gguf_file("smollm2")))
    writer = gguf.GGUFWriter(str(args.out), args.arch)
    writer.add_name(f"random {args.arch} {args.layers}x{args.hidden}x{args.intermediate} {args.type}")
    writer.add_block_count(args.layers)
    writer.add_context_length(GPT2_POSITIONS if args.arch == "gpt2" else 8192)
    writer.add_embedding_length(args.hidden)
    writer.add_feed_forward_length(args.intermediate)
    writer.add_head_count(args.heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    # transformers' GGUF loader reads no rotary base for StableLM: its default, 10000.
    writer.add_rope_freq_base(10000.0 if args.arch in ("gemma2", "stablelm") else 500000.0)
    if args.arch == "stablelm":
        writer.add_layer_norm_eps(1e-5)
        writer.add_rope_dimension_count(int(head_dim * STABLELM_ROTARY))
    elif args.arch in PLAIN:
        writer.add_layer_norm_eps(1e-5)
    else:
        writer.add_layer_norm_rms_eps(1e-6 if args.arch == "gemma2" else 1e-5)
        writer.add_rope_dimension_count(head_dim)
    if args.arch == "gemma2":
        writer.add_sliding_window(GEMMA2_WINDOW)
        writer.add_attn_logit_softcapping(50.0)
        writer.add_final_logit_softcapping(30.0)
    vocab = copy_tokenizer(source, writer)
    writer.add_vocab_size(vocab)

    rng = np.random.default_rng(args.seed)
    qd, kvd = args.heads * head_dim, args.kv_heads * head_dim

    def weight(name: str, rows: int, cols: int, kind=qtype) -> None:
        w = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
        writer.add_tensor(name, gguf.quants.quantize(w, kind), raw_dtype=kind)
        if args.arch in PLAIN and name.startswith("blk."):  # every projection has a bias
            writer.add_tensor(name.replace(".weight", ".bias"), np.zeros(rows, dtype=np.float32))

    def ones(name: str, n: int) -> None:
        writer.add_tensor(name, np.ones(n, dtype=np.float32))
        if args.arch in BIASED:  # a LayerNorm's bias beside its weight
            writer.add_tensor(name.replace(".weight", ".bias"), np.zeros(n, dtype=np.float32))

    weight("token_embd.weight", vocab, args.hidden, gguf.GGMLQuantizationType.Q8_0)
    if args.arch == "bloom":
        ones("token_embd_norm.weight", args.hidden)
    if args.arch == "gpt2":
        positions = rng.standard_normal((GPT2_POSITIONS, args.hidden), dtype=np.float32) * np.float32(0.01)
        writer.add_tensor("position_embd.weight", positions)
    for i in range(args.layers):
        print(f"layer {i + 1} of {args.layers}", file=sys.stderr, flush=True)
        ones(f"blk.{i}.attn_norm.weight", args.hidden)
        if args.arch in PLAIN:
            weight(f"blk.{i}.attn_qkv.weight", qd + 2 * kvd, args.hidden)
        else:
            weight(f"blk.{i}.attn_q.weight", qd, args.hidden)
            weight(f"blk.{i}.attn_k.weight", kvd, args.hidden)
            weight(f"blk.{i}.attn_v.weight", kvd, args.hidden)
        weight(f"blk.{i}.attn_output.weight", args.hidden, qd)
        if args.arch == "qwen3":
            ones(f"blk.{i}.attn_q_norm.weight", head_dim)
            ones(f"blk.{i}.attn_k_norm.weight", head_dim)
        if args.arch == "gemma2":
            ones(f"blk.{i}.post_attention_norm.weight", args.hidden)
            ones(f"blk.{i}.post_ffw_norm.weight", args.hidden)
        ones(f"blk.{i}.ffn_norm.weight", args.hidden)
        if args.arch not in PLAIN:
            weight(f"blk.{i}.ffn_gate.weight", args.intermediate, args.hidden)
        weight(f"blk.{i}.ffn_up.weight", args.intermediate, args.hidden)
        weight(f"blk.{i}.ffn_down.weight", args.hidden, args.intermediate)
    ones("output_norm.weight", args.hidden)
    if args.arch == "stablelm":
        weight("output.weight", vocab, args.hidden, gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.0f} MiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
