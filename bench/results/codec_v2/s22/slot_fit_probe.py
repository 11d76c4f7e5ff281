"""Slot windows fitted per channel to the calibration tokens' codes, against the class-table rule,
on the harness's own configs (a cost model on real codes, as s21/slot_variants.py).

    python bench/results/codec_v2/s22/slot_fit_probe.py --model gemma3 --layers 13

Calibrates as ``bench/e2e/codec_v2.py --bits measured`` does (mixed calibration windows, the
measured rule), encodes the first 1024 Botchan tokens in 512-token windows and prints the symbol
stream's bits per symbol with the config's windows, with windows fitted per channel to the
calibration tokens' codes (each symbol counted 16 times plus once, so none is impossible), and with
windows fitted to each window's own codes (what frame-adaptive windows could reach before the cost
of sending them).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

E2E = Path(__file__).resolve().parents[3] / "e2e"
sys.path.insert(0, str(E2E))
from codec_v2 import CALIB_OFFSET, default_layers, wire_dtypes  # noqa: E402
from common import CONTEXT  # noqa: E402

from splitkernels.codec import encode, slots  # noqa: E402
from splitkernels.codec.measured import calibrate_measured  # noqa: E402
from splitkernels.codec.predict import embedding_table  # noqa: E402
from splitkernels.codec.sensitivity import fisher_diagonal  # noqa: E402
from splitkernels.eval import load_text  # noqa: E402
from splitkernels.eval.calibration_text import calibration_windows  # noqa: E402
from splitkernels.models import load_model  # noqa: E402


def symbols_of(h: torch.Tensor, cfg, ids, table) -> np.ndarray:
    enc = encode(h, cfg, start=0, tokens=ids, embedding=table)
    return enc.symbols.numpy()[~enc.raw.numpy()].astype(np.int64)


def cost(sym: np.ndarray, a: np.ndarray, w: np.ndarray, nsym: int) -> float:
    return float(sum(slots.code_bits(nsym, int(a[c]), int(w[c]))[sym[:, c]].sum() for c in range(sym.shape[1])))


def fitted(counts_of: np.ndarray, nsym: int) -> tuple[np.ndarray, np.ndarray]:
    pairs = [slots.table_params(tuple(int(v) for v in 16 * np.bincount(col, minlength=nsym) + 1)) for col in counts_of.T]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3")
    ap.add_argument("--layers", type=int, nargs="*", default=None)
    ap.add_argument("--save", default=None, help="folder: each layer's codes and windows as NPZ")
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    model.eval()
    layers = args.layers or default_layers(model.config.num_hidden_layers)
    ids = tok(load_text("botchan"), return_tensors="pt").input_ids[0]
    calib, _ = calibration_windows(lambda t: tok(t, return_tensors="pt").input_ids[0], 1536, CONTEXT,
                                   prose_start=CALIB_OFFSET)
    wires = wire_dtypes(model, calib, layers)
    table = embedding_table(model)
    for layer in layers:
        fisher = fisher_diagonal(model, calib, layer)
        cfg = calibrate_measured(model, list(calib), layer, fisher, wire_dtype=wires[layer])
        nsym = len(cfg.freqs)
        a0, w0 = (np.broadcast_to(p, (cfg.d,)) for p in cfg.slot_params)
        cal = np.concatenate([symbols_of(model_hidden(model, w, layer).to(wires[layer]), cfg, w, table) for w in calib])
        a1, w1 = fitted(cal, nsym)
        windows = [symbols_of(model_hidden(model, ids[s : s + CONTEXT], layer).to(wires[layer]), cfg,
                              ids[s : s + CONTEXT], table) for s in (0, CONTEXT)]
        ev = np.concatenate(windows)
        base, fit = cost(ev, a0, w0, nsym) / ev.size, cost(ev, a1, w1, nsym) / ev.size
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            np.savez_compressed(Path(args.save) / f"{args.model}_layer{layer}.npz", calib=cal.astype(np.uint8),
                                windows=np.stack(windows).astype(np.uint8), starts=a0, widths=w0, nsym=nsym,
                                tables=np.asarray(cfg.rans_tables.tables), table_of=np.asarray(cfg.rans_tables.table_of))
        own = sum(cost(win, *fitted(win, nsym), nsym) for win in windows) / ev.size
        print(f"{loaded.name} layer {layer}: class tables {base:.4f}, fitted on calibration {fit:.4f} "
              f"({fit - base:+.4f}), fitted on each 512-token window {own:.4f} ({own - base:+.4f}, before the "
              f"window's parameters) bits per symbol; widths changed on {(w0 != w1).sum()} of {cfg.d} channels", flush=True)


def model_hidden(model, window: torch.Tensor, layer: int) -> torch.Tensor:
    with torch.no_grad():
        return model(window[None], output_hidden_states=True).hidden_states[layer][0]


if __name__ == "__main__":
    main()
