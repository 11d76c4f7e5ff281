"""Bits per symbol of static rANS (class tables), Rice (per class) and nibble on the dumped symbols.

    python bench/results/codec_v2/s16/symbol_probe/table_bits.py OUT_DIR   (after probe_symbols.py)
"""
import sys
from pathlib import Path

import numpy as np

from splitkernels.codec import nibble, rice
from splitkernels.codec.config_v2 import CodecConfigV2

for f in sorted(Path(sys.argv[1]).glob("*.json")):
    cfg = CodecConfigV2.from_json(f.read_text())
    sym = np.load(f.with_name(f.stem + "_symbols.npy")).reshape(-1, cfg.d)
    sym = sym[np.any(sym != 0, axis=1)]  # raw rows carry no symbols
    tables = np.asarray(cfg.class_freqs, dtype=np.float64)
    cls = np.asarray(cfg.channel_class)
    p = tables[cls] / tables.sum(1, keepdims=True)[cls]
    rans_bits = -np.log2(p[np.arange(cfg.d)[None, :], sym]).mean()
    centres, ks = cfg.rice_params
    rice_bits = 8 * len(rice.encode(sym, centres, ks, len(cfg.freqs))) / sym.size
    nibble_bits = 8 * len(nibble.encode_reference(sym, cfg.freqs)) / sym.size
    print(f"{f.stem:18s} rANS {rans_bits:.3f}  Rice {rice_bits:.3f}  nibble {nibble_bits:.3f}")
