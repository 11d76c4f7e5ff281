"""Probe: per-token table sets, bits saved out of sample (ideal code lengths)."""
import sys, math, torch, numpy as np
from pathlib import Path
from splitkernels.models import load_packaged
from splitkernels.codec import calibrate, encode
from splitkernels.codec.sensitivity import fisher_diagonal, split_hidden_states
from splitkernels.eval.calibration_text import calibration_windows
from splitkernels.codec.rans import build_freqs

model_name, layer = sys.argv[1], int(sys.argv[2])
model, tok = load_packaged(model_name); model.eval()
enc = lambda t: tok(t, return_tensors="pt").input_ids[0]
calib, _ = calibration_windows(enc, 1536, 512, prose_start=8192)
fisher = fisher_diagonal(model, calib, layer)
wire = torch.float32 if fisher.hidden.abs().max() > 6e4 else torch.float16
cfg = calibrate(fisher.hidden, sensitivity=fisher.channel, position_sensitivity=fisher.position, wire_dtype=wire)
ids = enc(Path(sys.argv[3]).read_text())[:1024].reshape(2, 512)
with torch.no_grad():
    ev = split_hidden_states(model, list(ids), layer)
def syms(h):
    out = []
    for w in h.reshape(-1, 512, h.shape[-1]):
        e = encode(w.to(wire), cfg, start=0)
        s = e.symbols.numpy().astype(np.int64); s[e.raw.numpy()] = -1
        out.append(s)
    return np.concatenate(out)
cs, es = syms(fisher.hidden), syms(ev)
k = cfg.kmax; n = 2 * k + 2
cls = np.asarray(cfg.channel_class) if cfg.channel_class is not None else np.zeros(cs.shape[1], int)
K = cls.max() + 1
def tables(s, tokset, S):
    T = np.zeros((S, K, n))
    for si in range(S):
        rows = s[(tokset == si) & (s[:, 0] >= 0)]
        for c in range(K):
            cnt = np.bincount(rows[:, cls == c].ravel(), minlength=n)
            T[si, c] = np.asarray(build_freqs(cnt + 0.5)) / 16384.0
    return -np.log2(T)
def cost_rows(s, L):  # [T, S] bits per row under each set
    ok = s[:, 0] >= 0
    out = np.zeros((s.shape[0], L.shape[0]))
    for si in range(L.shape[0]):
        out[:, si] = L[si][cls[None, :], np.maximum(s, 0)].sum(1)
    return out[ok]
mag = lambda s: np.abs(s - k).mean(1)
d = cs.shape[1]
base = cost_rows(es, tables(cs, np.zeros(len(cs), int), 1))[:, 0]
print(f"{model_name} split {layer}: one set {base.mean() / d:.4f} bits/elem (eval, ideal)")
for S in (2, 4, 8):
    edges = np.quantile(mag(cs[cs[:, 0] >= 0]), np.linspace(0, 1, S + 1)[1:-1])
    L = tables(cs, np.searchsorted(edges, mag(cs)), S)
    # one refinement pass: reassign calibration tokens to their cheapest set, rebuild
    for _ in range(2):
        a = np.full(len(cs), -1); ok = cs[:, 0] >= 0
        a[ok] = cost_rows(cs, L).argmin(1); L = tables(cs, a, S)
    c = cost_rows(es, L).min(1) + math.log2(S)
    print(f"  {S} sets: {c.mean() / d:.4f} bits/elem  gain {(base.mean() - c.mean()) / d:.4f}")
