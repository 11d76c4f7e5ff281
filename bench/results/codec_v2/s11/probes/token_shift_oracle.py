"""Probe: what finer steps for given tokens of a window would buy (KL per 512-token window, window 1
without BOS), on the measured rule's config: newline tokens below a position bound at step / 2**s.
Usage: python token_shift_oracle.py <model> <split> <text file>"""
import sys
from pathlib import Path

import torch

from splitkernels.codec import decode, encode
from splitkernels.codec.measured import calibrate_measured
from splitkernels.codec.predict import embedding_table
from splitkernels.codec.sensitivity import fisher_diagonal
from splitkernels.eval.calibration_text import calibration_windows
from splitkernels.models import load_packaged
from splitkernels.opsc import decoder_layers

model_name, layer, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model, tok = load_packaged(model_name)
model.eval()
enc_t = lambda t: tok(t, return_tensors="pt").input_ids[0]  # noqa: E731
calib, _ = calibration_windows(enc_t, 1536, 512, prose_start=8192)
fisher = fisher_diagonal(model, calib, layer)
wire = torch.float16
table = embedding_table(model)
cfg = calibrate_measured(model, list(calib), layer, fisher, wire_dtype=wire)
print(f"prediction={cfg.prediction is not None} shifts={cfg.position_shift}")
ids = enc_t(Path(path).read_text())[:1024].reshape(2, 512)
layers = decoder_layers(model)
step, center = torch.tensor(cfg.step), torch.tensor(cfg.center)
for wi, w in enumerate(ids):
    strs = [tok.decode([int(i)]) for i in w]
    nl = torch.tensor(["\n" in s for s in strs])
    print(f"window {wi}: {int(nl.sum())} newline tokens, ids {sorted(set(int(i) for i, n in zip(w, nl) if n))}")
    for bound, s in ((0, 0), (128, 2), (128, 3), (256, 3), (512, 3), (128, 5)):
        finer = nl & (torch.arange(512) < bound)

        def hook(m, i, o, w=w, finer=finer, s=s):
            h = o[0] if isinstance(o, tuple) else o
            x = h[0].to(wire)
            y = decode(encode(x, cfg, start=0, tokens=w, embedding=table), embedding=table).float()
            if finer.any():
                p = cfg.prediction.values(w, table) if cfg.prediction is not None else 0.0
                u = x.float() - p
                fine = step / 2**s
                yf = torch.round((u - center) / fine) * fine + center + p
                y[finer] = yf[finer]
            y = y.to(h.dtype)[None]
            return (y, *o[1:]) if isinstance(o, tuple) else y

        with torch.no_grad():
            ref = torch.log_softmax(model(w[None]).logits[0].float(), -1)
            hd = layers[layer - 1].register_forward_hook(hook)
            try:
                lp = torch.log_softmax(model(w[None]).logits[0].float(), -1)
            finally:
                hd.remove()
        kl = (ref.exp() * (ref - lp)).sum(-1)[:-1]
        print(f"  newlines below {bound:3d} at step/2^{s}: {int(finer.sum()):2d} tokens, KL {float(kl.mean()):.4f}")
