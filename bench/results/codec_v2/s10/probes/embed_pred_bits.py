"""Probe: coded bits of late one-token frames with the token's own embedding as a per-channel
diagonal prediction, at the same per-channel steps (same noise), ideal code lengths."""
import sys, math, torch, numpy as np
from pathlib import Path
from splitkernels.models import load_packaged
from splitkernels.codec import calibrate
from splitkernels.codec.sensitivity import fisher_diagonal, split_hidden_states
from splitkernels.eval.calibration_text import calibration_windows

model_name = sys.argv[1]; layers = [int(v) for v in sys.argv[2].split(",")]
model, tok = load_packaged(model_name); model.eval()
enc = lambda t: tok(t, return_tensors="pt").input_ids[0]
calib, _ = calibration_windows(enc, 1536, 512, prose_start=8192)
ev_ids = enc(Path(sys.argv[3]).read_text())[:1024].reshape(2, 512)
E = model.get_input_embeddings()
late_c = (torch.arange(1536) % 512) >= 256
late_e = (torch.arange(1024) % 512) >= 256
for layer in layers:
    fisher = fisher_diagonal(model, calib, layer)
    cfg = calibrate(fisher.hidden, sensitivity=fisher.channel, position_sensitivity=fisher.position, wire_dtype=torch.float32)
    step = torch.tensor(cfg.step, dtype=torch.float64); k = cfg.kmax
    cls = torch.tensor(cfg.channel_class) if cfg.channel_class is not None else torch.zeros(len(step), dtype=torch.long)
    with torch.no_grad():
        hc = fisher.hidden.double()[late_c]; he = split_hidden_states(model, list(ev_ids), layer).double()[late_e]
        ec = E(torch.cat(list(calib))).double()[late_c]; ee = E(ev_ids.reshape(-1)).double()[late_e]
    a = ((ec - ec.mean(0)) * (hc - hc.mean(0))).mean(0) / (ec - ec.mean(0)).pow(2).mean(0).clamp_min(1e-30)
    def bits(rc, re):
        center = rc.median(0).values
        qc = torch.round((rc - center) / step); qe = torch.round((re - center) / step)
        tot, esc = 0.0, 0
        for c in range(int(cls.max()) + 1):
            sel = cls == c
            vc = qc[:, sel].clamp(-k - 1, k + 1).long().ravel() + k + 1
            ve = qe[:, sel].clamp(-k - 1, k + 1).long().ravel() + k + 1
            p = (torch.bincount(vc, minlength=2 * k + 3).double() + 0.5); p /= p.sum()
            tot += float(-torch.log2(p[ve]).sum())
            esc += int(((qe[:, sel].abs()) > k).sum())
        return tot / re.numel(), esc / re.numel()
    b0, e0 = bits(hc, he)
    for shrink in (1.0, 0.5):
        b1, e1 = bits(hc - shrink * a * ec, he - shrink * a * ee)
        print(f"{model_name} split {layer} (kmax {k}): plain {b0:.3f} bits/elem (escapes {e0:.4f}), "
              f"embedding-predicted x{shrink} {b1:.3f} (escapes {e1:.4f}): {b1 - b0:+.3f}")
