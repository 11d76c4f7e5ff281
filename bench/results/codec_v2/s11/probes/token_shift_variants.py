"""Probe: KL per 512-token window of the measured rule's config and of variants of its token shifts
(window 1 without BOS). Usage: python token_shift_variants.py <model> <split> <text file>"""
import dataclasses
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
table = embedding_table(model)
cfg = calibrate_measured(model, list(calib), layer, fisher, wire_dtype=torch.float16)
print("token shifts", cfg.token_shift, "kmax", cfg.kmax)
ids = enc_t(Path(path).read_text())[:1024].reshape(2, 512)
layers = decoder_layers(model)
base = dict(cfg.token_shift)
variants = {"calibrated": base, "none": {}, "plus 108:2": {**base, 108: 2}, "all +1": {i: s + 1 for i, s in base.items()},
            "plus 108, all +1": {**{i: s + 1 for i, s in base.items()}, 108: 3}}
for name, shifts in variants.items():
    c = dataclasses.replace(cfg, token_shift=tuple(sorted(shifts.items())))
    kls = []
    for w in ids:
        def hook(m, i, o, w=w):
            h = o[0] if isinstance(o, tuple) else o
            y = decode(encode(h[0].half(), c, start=0, tokens=w, embedding=table), embedding=table).to(h.dtype)[None]
            return (y, *o[1:]) if isinstance(o, tuple) else y
        with torch.no_grad():
            ref = torch.log_softmax(model(w[None]).logits[0].float(), -1)
            hd = layers[layer - 1].register_forward_hook(hook)
            try:
                lp = torch.log_softmax(model(w[None]).logits[0].float(), -1)
            finally:
                hd.remove()
        kls.append(float((ref.exp() * (ref - lp)).sum(-1)[:-1].mean()))
    print(f"{name:18s} window 0 KL {kls[0]:.4f}  window 1 KL {kls[1]:.4f}  mean {sum(kls) / 2:.4f}")
