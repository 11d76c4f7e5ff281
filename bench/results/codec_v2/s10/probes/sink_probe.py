"""Probe: in a window without BOS, which tokens carry the split's sensitivity, and does their split
hidden state single them out (norm, largest equalised value, escapes under the session config)?"""
import sys, torch, numpy as np
from pathlib import Path
from splitkernels.models import load_packaged
from token_fisher import token_fisher
from splitkernels.codec import calibrate, encode
from splitkernels.codec.sensitivity import fisher_diagonal
from splitkernels.eval.calibration_text import calibration_windows

model_name, layer, path, K = sys.argv[1], int(sys.argv[2]), sys.argv[3], 8
model, tok = load_packaged(model_name); model.eval()
enc_t = lambda t: tok(t, return_tensors="pt").input_ids[0]
calib, _ = calibration_windows(enc_t, 1536, 512, prose_start=8192)
fisher = fisher_diagonal(model, calib, layer)
cfg = calibrate(fisher.hidden, sensitivity=fisher.channel, position_sensitivity=fisher.position, wire_dtype=torch.float16)
w = enc_t(Path(path).read_text())[512:1024]
F, h = token_fisher(model, [w], layer, K)
z = (h - torch.tensor(cfg.center)) / torch.tensor(cfg.step)
e = encode(h.half(), cfg, start=0)
esc = (e.symbols == cfg.escape_symbol).sum(1)
strs = [tok.decode([int(i)]) for i in w]
med = float(F[1:].median())
order = torch.argsort(F, descending=True)
print(f"median F {med:.3g}; share of the total trace held by the top 5/10/20 tokens:",
      [round(float(F[order[:n]].sum() / F.sum()), 3) for n in (5, 10, 20)])
print("newline tokens:", sum("\n" in s for s in strs))
for t in order[:20].tolist():
    print(f"pos {t:3d} F/median {float(F[t]) / med:8.1f} {strs[t]!r:12} norm|z| {float(z[t].norm()):7.1f} max|z| {float(z[t].abs().max()):7.1f} "
          f"escapes {int(esc[t])} raw {bool(e.raw[t])}")
nz = z.norm(dim=1)
print("norm|z| median over tokens", float(nz.median()), "corr(log F, log norm)", float(np.corrcoef(np.log(F.numpy()[1:]), np.log(nz.numpy()[1:]))[0, 1]))
