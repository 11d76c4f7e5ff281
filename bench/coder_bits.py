"""Bits per symbol of candidate symbol coders on real codec v2 codes, and the speed of the built ones.

    python bench/coder_bits.py --out DIR [--layer 15] [--massive-layer 10]

For SmolLM2 (split layer ``--layer``, fp16 wire) and the massive-activation fixture (layer
``--massive-layer``, bf16 wire), a v2 config is calibrated at 4 bits with the diagonal Fisher exactly
as bench/e2e/codec_v2.py does, one 512-token evaluation window is quantised, and its symbols are
costed under: the empirical entropy, static rANS (the bytes it writes), a static Huffman code of the
empirical counts (lengths unlimited: a lower bound for any Huffman variant), the Rice codes in bit
planes and the slot coder (the bytes they write, with the config's channel-class parameters), the
nibble coder (the bytes it writes), block-adaptive bit packing (per block of 16/32/64 zigzag codes: the block's width
plus a 4-bit width header) and PFor-style packing (4 low bits per code, exceptions at 6 + 8 bits).
Only the stream is costed (no frame header, escape values or raw tokens). The C++ coders (Rice bit
planes, slots, nibble) are also timed on the same symbols, each call on its own (M symbols/s of
encode and decode, one thread, thread CPU time, median of 31 after a warm-up), since their speed
depends on the codes (the slot coder's escape rate, the bit planes' quotients). JSON + tables into
--out.
"""
from __future__ import annotations

import argparse
import heapq
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
from bench_codec_v2 import median_time  # noqa: E402
from codec_v2 import CALIB_OFFSET, MASSIVE_CHANNEL  # noqa: E402
from common import CONTEXT  # noqa: E402
from massive import massive_channel_copy  # noqa: E402

from splitkernels.codec import calibrate, encode, nibble, planes, rans, slots  # noqa: E402
from splitkernels.codec.sensitivity import fisher_diagonal  # noqa: E402
from splitkernels.eval import load_text  # noqa: E402
from splitkernels.models import load_smollm2  # noqa: E402


def huffman_bits(counts: np.ndarray) -> float:
    """Mean code length of a Huffman code of ``counts`` (symbols with count 0 left out)."""
    heap = [(int(c), i, [i]) for i, c in enumerate(counts) if c > 0]
    heapq.heapify(heap)
    length = np.zeros(counts.shape[0])
    tie = counts.shape[0]
    while len(heap) > 1:
        w1, _, a = heapq.heappop(heap)
        w2, _, b = heapq.heappop(heap)
        length[a + b] += 1
        heapq.heappush(heap, (w1 + w2, tie, a + b))
        tie += 1
    return float((counts * length).sum() / counts.sum())


def zigzag(sym: np.ndarray, kmax: int) -> np.ndarray:
    q = sym.astype(np.int64).ravel() - kmax
    return np.where(q >= 0, 2 * q, -2 * q - 1)


def block_bits(zz: np.ndarray, block: int) -> float:
    n = zz.size // block * block
    width = np.ceil(np.log2(zz[:n].reshape(-1, block).max(1) + 1))
    return float((width.sum() * block + 4 * width.size) / n)


def costs(sym: np.ndarray, cfg) -> dict:
    freqs, kmax = cfg.freqs, cfg.kmax
    counts = np.bincount(sym.ravel(), minlength=len(freqs))
    p = counts[counts > 0] / counts.sum()
    zz = zigzag(sym, kmax)
    return {
        "symbols": int(sym.size),
        "entropy": float(-(p * np.log2(p)).sum()),
        "rans": 8 * len(rans.encode(sym.ravel(), freqs)) / sym.size,
        "huffman (unlimited lengths)": huffman_bits(counts),
        "Rice bit planes": 8 * len(planes.encode(sym, None, *cfg.rice_params, len(freqs))) / sym.size,
        "slots": 8 * len(slots.encode(sym, None, *cfg.slot_params, len(freqs))) / sym.size,
        "nibble": 8 * len(nibble.encode(sym, None, freqs)) / sym.size,
        **{f"block-adaptive {b}": block_bits(zz, b) for b in (16, 32, 64)},
        "PFor 4 bits + exceptions": float(4 + (zz >= 16).mean() * (6 + 8)),
    }


def speeds(sym: np.ndarray, cfg, repeats: int = 31) -> dict:
    """M symbols/s of encode and decode of each built C++ coder on ``sym``, median of ``repeats``."""
    nsym, d = len(cfg.freqs), sym.shape[1]
    no_raw = np.zeros(sym.shape[0], dtype=bool)
    coders = {
        "Rice bit planes": (lambda: planes.encode(sym, None, *cfg.rice_params, nsym),
                            lambda b: planes.decode(b, no_raw, *cfg.rice_params, nsym, d), planes.has_native()),
        "slots": (lambda: slots.encode(sym, None, *cfg.slot_params, nsym),
                  lambda b: slots.decode(b, no_raw, *cfg.slot_params, nsym, d), slots.has_native()),
        "nibble": (lambda: nibble.encode(sym, None, cfg.freqs), lambda b: nibble.decode(b, cfg.freqs, no_raw, d),
                   nibble.has_native()),
    }

    result = {}
    for name, (enc, dec, native) in coders.items():
        if native:
            data = enc()
            result[name] = {"encode_msym_s": sym.size / median_time(enc, repeats) / 1e6,
                            "decode_msym_s": sym.size / median_time(lambda: dec(data), repeats) / 1e6}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--massive-layer", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    result = {}
    for name, factor, layer in (("SmolLM2-135M", None, args.layer), ("massive fixture", 1000.0, args.massive_layer)):
        model, tok = load_smollm2()
        wire = torch.float16
        if factor:
            massive_channel_copy(model, MASSIVE_CHANNEL, factor)
            wire = torch.bfloat16
        model.eval()
        ids = tok(load_text("botchan"), return_tensors="pt").input_ids[0]
        calib = ids[CALIB_OFFSET : CALIB_OFFSET + 1024].reshape(-1, CONTEXT)
        fisher = fisher_diagonal(model, calib, layer)
        cfg = calibrate(fisher.hidden, bits=4.0, sensitivity=fisher.channel, wire_dtype=wire)
        with torch.no_grad():
            h = model(ids[:CONTEXT][None], output_hidden_states=True).hidden_states[layer][0]
        enc = encode(h.to(wire), cfg)
        sym = enc.symbols.numpy()[~enc.raw.numpy()]
        result[f"{name} layer {layer}"] = {**costs(sym, cfg), "speed": speeds(sym, cfg)}
        print(name, layer, result[f"{name} layer {layer}"], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "coder_bits.json").write_text(json.dumps(result, indent=1))
    coders = [c for c in next(iter(result.values())) if c not in ("symbols", "speed")]
    lines = ["| codes (one 512-token window) | " + " | ".join(coders) + " |", "|---|" + "---|" * len(coders)]
    for key, r in result.items():
        lines.append(f"| {key} | " + " | ".join(f"{r[c]:.3f}" for c in coders) + " |")
    lines += ["", "M symbols/s of the C++ coders on the same symbols (one thread, thread CPU time, median of 31), "
              "encode / decode:", "", "| codes | " + " | ".join(next(iter(result.values()))["speed"]) + " |",
              "|---|" + "---|" * len(next(iter(result.values()))["speed"])]
    for key, r in result.items():
        lines.append(f"| {key} | " + " | ".join(f"{v['encode_msym_s']:.0f} / {v['decode_msym_s']:.0f}"
                                               for v in r["speed"].values()) + " |")
    (out / "coder_bits.md").write_text("bits per symbol of the symbol stream\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
