"""Probe: KL per 512-token window (window 0 starts with BOS, window 1 does not) of the measured rule
with and without the token prediction, and where the frames differ (raw tokens, escapes).
Usage: python predict_windows.py <model> <split> <text file>"""
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
ids = enc_t(Path(path).read_text())[:1024].reshape(2, 512)
layers = decoder_layers(model)
for predict in (False, True):
    cfg = calibrate_measured(model, list(calib), layer, fisher, wire_dtype=wire, predict=predict)
    print(f"predict={predict} prediction={cfg.prediction is not None} kl_ratio={cfg.info['kl_ratio']:.2f} "
          f"est_bits={cfg.info['estimated_bits']:.3f} kmax={cfg.kmax}")
    for wi, w in enumerate(ids):
        stats = {}

        def hook(m, i, o, w=w, stats=stats):
            h = o[0] if isinstance(o, tuple) else o
            e = encode(h[0].to(wire), cfg, start=0, tokens=w, embedding=table)
            stats.update(raw=int(e.raw.sum()), raw_at=e.raw.nonzero().flatten().tolist()[:6], escapes=int(e.escapes.numel()),
                         bits=8 * len(e.to_bytes()) / h[0].numel())
            y = decode(e, embedding=table).to(h.dtype)[None]
            return (y, *o[1:]) if isinstance(o, tuple) else y

        with torch.no_grad():
            ref = torch.log_softmax(model(w[None]).logits[0].float(), -1)
            hd = layers[layer - 1].register_forward_hook(hook)
            try:
                lp = torch.log_softmax(model(w[None]).logits[0].float(), -1)
            finally:
                hd.remove()
        kl = (ref.exp() * (ref - lp)).sum(-1)[:-1]
        bands = [float(kl[a:b].sum()) / 511 for a, b in ((0, 32), (32, 64), (64, 128), (128, 256), (256, 511))]
        print(f"  window {wi} KL {float(kl.mean()):.4f} bits {stats['bits']:.3f} raw {stats['raw']} at {stats['raw_at']} "
              f"escapes {stats['escapes']}  KL by output band <32,<64,<128,<256,<511: " + " ".join(f"{v:.4f}" for v in bands))
