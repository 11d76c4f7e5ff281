"""Dump, per model and default split, the measured-rule config and the symbols of two evaluation windows.

    python bench/results/codec_v2/s16/symbol_probe/probe_symbols.py MODEL OUT_DIR
"""
import sys

import numpy as np
import torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "e2e"))
from common import CONTEXT
from codec_v2 import default_layers, wire_dtypes, CALIB_OFFSET
from splitkernels.codec import encode
from splitkernels.codec.measured import calibrate_measured
from splitkernels.codec.predict import embedding_table
from splitkernels.codec.sensitivity import fisher_diagonal
from splitkernels.eval import load_text
from splitkernels.eval.calibration_text import calibration_windows
from splitkernels.models import load_model

name = sys.argv[1]; out = Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
loaded = load_model(name); model, tok = loaded.model, loaded.tokenizer; model.eval()
layers = default_layers(model.config.num_hidden_layers)
ids = tok(load_text("botchan"), return_tensors="pt").input_ids[0]
calib, _ = calibration_windows(lambda t: tok(t, return_tensors="pt").input_ids[0], 1536, CONTEXT, prose_start=CALIB_OFFSET)
wires = wire_dtypes(model, calib, layers)
table = embedding_table(model)
for layer in layers:
    fisher = fisher_diagonal(model, calib, layer)
    cfg = calibrate_measured(model, list(calib), layer, fisher, wire_dtype=wires[layer], predict=True)
    (out / f"{name}_{layer}.json").write_text(cfg.to_json())
    syms = []
    with torch.no_grad():
        for w in range(2):
            win = ids[w * CONTEXT:(w + 1) * CONTEXT]
            hs = model(win[None], output_hidden_states=True).hidden_states[layer][0].to(wires[layer])
            enc = encode(hs, cfg, start=0, tokens=win, embedding=table)
            syms.append(enc.symbols.numpy())
            print(name, layer, w, enc.nbytes * 8 / hs.numel(), flush=True)
    np.save(out / f"{name}_{layer}_symbols.npy", np.stack(syms))
