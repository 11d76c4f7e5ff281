"""Probe: which token ids are heavy (Fisher trace far above the late positions') at early positions of
the calibration windows, per id: occurrences below position 128 and their mean trace / the late mean.
Usage: python token_traces.py <model> <split>"""
import sys

import torch

from splitkernels.codec.sensitivity import fisher_diagonal
from splitkernels.eval.calibration_text import calibration_windows
from splitkernels.models import load_packaged

model_name, layer = sys.argv[1], int(sys.argv[2])
model, tok = load_packaged(model_name)
model.eval()
enc_t = lambda t: tok(t, return_tensors="pt").input_ids[0]  # noqa: E731
calib, _ = calibration_windows(enc_t, 1536, 512, prose_start=8192)
fisher = fisher_diagonal(model, calib, layer)
ids = torch.cat(list(calib))
pos = torch.arange(512).repeat(len(calib))
late = float(fisher.position[256:].mean())
early = (pos >= 1) & (pos < 128)
stats = []
for i in ids[early].unique().tolist():
    sel = early & (ids == i)
    n = int(sel.sum())
    if n >= 3:
        stats.append((float(fisher.token[sel].mean()) / late, n, i))
stats.sort(reverse=True)
print(f"late trace {late:.3g}; ids with >= 3 occurrences at positions 1..127: {len(stats)}")
for r, n, i in stats[:25]:
    print(f"  id {i:6d} {tok.decode([i])!r:12s} n={n:3d} mean trace / late {r:8.1f}")
