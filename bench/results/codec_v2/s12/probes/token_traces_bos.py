"""Probe: per token id at positions 1..127 of the calibration windows, the Fisher trace / late mean,
split by whether the window starts with BOS. Usage: python token_traces_bos.py <model> <split> <tokens>"""
import sys

import torch

from splitkernels.codec.sensitivity import fisher_diagonal
from splitkernels.eval.calibration_text import calibration_windows
from splitkernels.models import load_packaged

model_name, layer, n_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model, tok = load_packaged(model_name)
model.eval()
enc_t = lambda t: tok(t, return_tensors="pt").input_ids[0]  # noqa: E731
calib, used = calibration_windows(enc_t, n_tokens, 512, prose_start=8192)
print(used, "BOS id", tok.bos_token_id, "window starts", [int(w[0]) for w in calib])
fisher = fisher_diagonal(model, calib, layer)
ids = torch.cat(list(calib))
pos = torch.arange(512).repeat(len(calib))
bos = torch.tensor([bool(w[0] == tok.bos_token_id) for w in calib]).repeat_interleave(512)
late = float(fisher.position[256:].mean())
early = (pos >= 1) & (pos < 128)
stats = []
for i in ids[early].unique().tolist():
    sel = early & (ids == i)
    n = int(sel.sum())
    if n >= 2:
        r = fisher.token[sel] / late
        nb = sel & ~bos
        rn = fisher.token[nb] / late
        stats.append((float(r.max()), n, i, float(r.mean()), int(nb.sum()), float(rn.mean()) if nb.any() else 0.0,
                      float(rn.max()) if nb.any() else 0.0))
stats.sort(reverse=True)
print(f"late trace {late:.3g}")
for mx, n, i, mean, nnb, mnb, mxnb in stats[:40]:
    print(f"  id {i:6d} {tok.decode([i])!r:14s} n={n:3d} mean {mean:7.1f} max {mx:7.1f} | no-BOS n={nnb:3d} mean {mnb:7.1f} max {mxnb:7.1f}")
top = (fisher.token[early] / late).topk(30)
print("heaviest early tokens:")
e_idx = early.nonzero().reshape(-1)[top.indices]
for r, j in zip(top.values.tolist(), e_idx.tolist()):
    print(f"  window {j // 512} pos {j % 512:3d} id {int(ids[j]):6d} {tok.decode([int(ids[j])])!r:14s} ratio {r:7.1f} bos={bool(bos[j])}")
