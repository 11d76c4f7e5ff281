"""Probe: which ids are heavier than other tokens at the same position in windows that do not
start with BOS. Short windows (128 tokens) cut mid-text from the three calibration kinds; per
occurrence at positions 1..127, trace / the mean trace of that position over the windows; ids
ranked by the mean of that ratio, for two disjoint halves of the windows (stability).
Usage: python sink_ids.py <model> <split> <windows per kind> <window>"""
import sys

import torch

from splitkernels.codec.sensitivity import fisher_diagonal
from splitkernels.eval.calibration_text import KINDS, kind_text
from splitkernels.models import load_packaged

model_name, layer, per_kind, win = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model, tok = load_packaged(model_name)
model.eval()
windows = []
for kind in KINDS:
    ids = tok(kind_text(kind), return_tensors="pt").input_ids[0]
    start = 8192 if kind == "prose" else 0
    ids = ids[start:]
    stride = (ids.shape[0] - win) // per_kind
    windows += [ids[1 + i * stride: 1 + i * stride + win] for i in range(per_kind)]  # never token 0: no BOS
fisher = fisher_diagonal(model, windows, layer)
ids = torch.cat(windows)
pos = torch.arange(win).repeat(len(windows))
widx = torch.arange(len(windows)).repeat_interleave(win)
tr = fisher.token.double()
prof = torch.stack([tr[pos == p].mean() for p in range(win)])
rel = tr / prof[pos]
late = float(fisher.position[win // 2:].mean())
print(f"{len(windows)} windows of {win}; profile / late mean: pos1 {prof[1] / late:.1f} pos4 {prof[4] / late:.1f} "
      f"pos16 {prof[16] / late:.1f} pos32 {prof[32] / late:.1f} pos64 {prof[64] / late:.1f}")
early = pos >= 1
def rank(sel_w):
    out = {}
    m = early & sel_w
    for i in ids[m].unique().tolist():
        s = m & (ids == i)
        if int(s.sum()) >= 3:
            out[i] = (float(rel[s].mean()), int(s.sum()), float((tr[s] / late).mean()))
    return out
halves = [rank(widx % 2 == 0), rank(widx % 2 == 1), rank(torch.ones_like(widx, dtype=torch.bool))]
allr = sorted(halves[2].items(), key=lambda kv: -kv[1][0])
print("id, text, all: rel mean (n, trace/late) | half A rel (n) | half B rel (n)")
for i, (r, n, tl) in allr[:30]:
    a = halves[0].get(i, (float("nan"), 0, 0)); b = halves[1].get(i, (float("nan"), 0, 0))
    print(f"  {i:6d} {tok.decode([i])!r:14s} {r:6.2f} (n={n:3d}, {tl:7.1f}) | {a[0]:6.2f} ({a[1]:3d}) | {b[0]:6.2f} ({b[1]:3d})")
