"""Probe: how much does per-token Fisher trace vary beyond position, and can the edge predict it?"""
import sys, math, torch, numpy as np
from pathlib import Path
from splitkernels.models import load_packaged
from token_fisher import token_fisher

model_name, layer, K = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
text = Path(sys.argv[4]).read_text()
model, tok = load_packaged(model_name); model.eval()
ids = tok(text, return_tensors="pt").input_ids[0][:1024].reshape(2, 512)
F, H = token_fisher(model, ids, layer, K)
F = F.numpy()
pos = np.tile(np.arange(512), 2)
band = np.array([0 if p == 0 else int(p).bit_length() for p in pos])
med = H[pos > 0].median(0).values; rms = (H[pos > 0] - med).pow(2).mean(0).sqrt().clamp_min(1e-6)
z = (H - med) / rms
feat = {"norm": z.norm(dim=1).numpy(), "maxabs": z.abs().max(1).values.numpy(), "rawnorm": H.norm(dim=1).numpy()}
m = pos >= 1
def gain(groups):
    Fm, g = F[m], groups[m]
    tot = math.log2(Fm.mean()); s = 0.0
    for u in np.unique(g):
        sel = g == u; s += sel.mean() * math.log2(Fm[sel].mean())
    return 0.5 * (tot - s)
print("tokens", m.sum(), "log2 F std", np.log2(F[m]).std())
print("gain band only", round(gain(band), 4))
late = m & (pos >= 64)
print("log2 F std within bands>=64:", np.log2(F[late]).std())
for name, f in feat.items():
    for nb in (2, 4, 8):
        q = np.zeros_like(pos)
        for b in np.unique(band):
            sel = band == b
            if sel.sum() < nb: continue
            edges = np.quantile(f[sel], np.linspace(0, 1, nb + 1)[1:-1])
            q[sel] = np.searchsorted(edges, f[sel])
        print(f"gain band x {name} q{nb}", round(gain(band * 16 + q), 4),
              " corr(log F, log f) late:", round(np.corrcoef(np.log2(F[late]), np.log(f[late] + 1e-9))[0, 1], 3))
# oracle: perfect per-token knowledge (noisy F inflates it)
print("oracle per token (noisy upper bound)", round(gain(np.arange(len(F))), 4))
top = np.argsort(-F * m)[:15]
for t in top:
    print("top", int(pos[t]), f"{F[t]:.3g}", repr(tok.decode([int(ids.reshape(-1)[t])])), f"norm={feat['norm'][t]:.1f} max={feat['maxabs'][t]:.1f}")
strs = [tok.decode([int(i)]) for i in ids.reshape(-1)]
def cls(s):
    if "\n" in s: return 0
    if s.strip() == "": return 1
    if not any(ch.isalnum() for ch in s): return 2
    return 3
c = np.array([cls(s) for s in strs])
print("gain band x tokclass", round(gain(band * 16 + c), 4))
print("gain band x tokclass x norm q2", round(gain((band * 16 + c) * 4 + (feat['norm'] > np.median(feat['norm'])).astype(int)), 4))
lm = m & (pos >= 32)
for k in range(4):
    sel = lm & (c == k)
    print("class", k, "n", sel.sum(), "mean log2 F", np.log2(F[sel]).mean() if sel.any() else None, "log2 mean F", np.log2(F[sel].mean()) if sel.any() else None)
np.savez("/tmp/s10/probe_%s_%d.npz" % (model_name, layer), F=F, pos=pos, c=c, norm=feat['norm'], maxabs=feat['maxabs'])
