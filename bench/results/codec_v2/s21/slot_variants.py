"""What the slot coder's bits would be with other parameter rules, on real codes (a cost model).

    python bench/results/codec_v2/s21/slot_variants.py

The codes of bench/coder_bits.py (SmolLM2 layer 15, fp16 wire; the massive-activation fixture layer
10, bf16 wire; one 512-token window, calibrated at 4 bits with the diagonal Fisher). Each symbol is
costed as the slot coder writes it (w bits inside its channel's window, w + D for a distance below
2^D - 1, w + D + 8 for a far byte; D = 4 is the coder's format, docs/FORMATS.md 5.9), with each
channel's (a, w) fitted to its calibrated class table: the coder's own rule for D = 4 (its total is
checked against the stream's length), other distance widths, a per-channel choice of D; then (a, w)
fitted per channel to the calibration tokens' codes (what a config could store), and an oracle
fitted to the window's own counts (what frame-adaptive windows could reach before their per-frame
cost). Prints bits per symbol of the symbol stream.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(BENCH), str(BENCH / "e2e")]

import coder_bits as cb  # noqa: E402

from splitkernels.codec import calibrate, encode, slots  # noqa: E402


def cost_rule(dist_bits: int):
    """Bits per symbol of a table of ``nsym`` symbols in window ``a``, width ``w``, with distances in
    ``dist_bits`` bits (all ones: a far byte follows)."""
    near = (1 << dist_bits) - 1

    def bits(nsym: int, a: int, w: int) -> np.ndarray:
        s = np.arange(nsym)
        inside = (s >= a) & (s < a + (1 << w) - 1)
        return np.where(inside, w, np.where(slots.distance(s, a, w) < near, w + dist_bits, w + dist_bits + 8))

    return bits


def fit(freqs, rule) -> tuple[int, int, int]:
    """(expected cost, a, w) of the cheapest width under ``rule``, each width's window the densest."""
    f = np.asarray(freqs, np.int64)
    best = None
    for w in range(1, slots.MAX_WIDTH + 1):
        a = slots.window_start(f, (1 << w) - 1)
        cost = int((f * rule(len(f), a, w)).sum())
        if best is None or cost < best[0]:
            best = (cost, a, w)
    return best


def bits_per_symbol(sym: np.ndarray, cfg, rules) -> float:
    """Per channel the cheapest of ``rules`` (and its (a, w)) under the channel's class table, costed
    on the channel's symbols."""
    tables, table_of = cfg._rans.tables, cfg._rans.table_of
    nsym, total = len(cfg.freqs), 0
    for c in range(sym.shape[1]):
        table = tables[table_of[c] if len(table_of) > 1 else 0]
        _, a, w, rule = min(((*fit(table, r), r) for r in rules), key=lambda e: e[0])
        total += rule(nsym, a, w)[sym[:, c]].sum()
    return total / sym.size


def fitted_bits(sym: np.ndarray, fit_on: np.ndarray, nsym: int) -> float:
    """(a, w) per channel fitted to the channel's counts in ``fit_on`` (each symbol counted at least
    once, so none is impossible), D = 4, costed on ``sym``."""
    rule, total = cost_rule(4), 0
    for c in range(sym.shape[1]):
        _, a, w = fit(16 * np.bincount(fit_on[:, c], minlength=nsym) + 1, rule)
        total += rule(nsym, a, w)[sym[:, c]].sum()
    return total / sym.size


VARIANTS = {"D=4 (the format)": [cost_rule(4)], "D=3": [cost_rule(3)], "D=2": [cost_rule(2)],
            "D per channel 2..4": [cost_rule(2), cost_rule(3), cost_rule(4)],
            "D per channel 1..4": [cost_rule(1), cost_rule(2), cost_rule(3), cost_rule(4)]}

torch.manual_seed(0)
for name, factor, layer in (("SmolLM2-135M", None, 15), ("massive fixture", 1000.0, 10)):
    model, tok = cb.load_smollm2()
    wire = torch.float16
    if factor:
        cb.massive_channel_copy(model, cb.MASSIVE_CHANNEL, factor)
        wire = torch.bfloat16
    model.eval()
    ids = tok(cb.load_text("botchan"), return_tensors="pt").input_ids[0]
    calib = ids[cb.CALIB_OFFSET : cb.CALIB_OFFSET + 1024].reshape(-1, cb.CONTEXT)
    fisher = cb.fisher_diagonal(model, calib, layer)
    cfg = calibrate(fisher.hidden, bits=4.0, sensitivity=fisher.channel, wire_dtype=wire)
    with torch.no_grad():
        h = model(ids[: cb.CONTEXT][None], output_hidden_states=True).hidden_states[layer][0]
    enc = encode(h.to(wire), cfg)
    sym = enc.symbols.numpy()[~enc.raw.numpy()].astype(np.int64)
    stream = 8 * len(slots.encode(sym.astype(np.uint8), None, *cfg.slot_params, len(cfg.freqs))) / sym.size
    row = {k: round(float(bits_per_symbol(sym, cfg, rules)), 4) for k, rules in VARIANTS.items()}
    cal = encode(fisher.hidden.to(wire), cfg)
    calib_sym = cal.symbols.numpy()[~cal.raw.numpy()].astype(np.int64)
    row["fitted per channel on the calibration tokens (D=4)"] = round(float(fitted_bits(sym, calib_sym, len(cfg.freqs))), 4)
    row["oracle: fitted on this window (D=4)"] = round(float(fitted_bits(sym, sym, len(cfg.freqs))), 4)
    print(f"{name} layer {layer}: the coder's stream {stream:.4f}", row, flush=True)
