"""Probe: KL per 512-token window (window 0 starts with BOS, windows 1-3 do not) of the measured
rule's config and of token-shift variants, over several texts, at one split.
Usage: python sink_variants.py <model> <split> <text file>..."""
import dataclasses
import sys
from collections import Counter
from pathlib import Path

import torch

from splitkernels.codec import decode, encode
from splitkernels.codec.measured import calibrate_measured
from splitkernels.codec.predict import embedding_table
from splitkernels.codec.sensitivity import fisher_diagonal
from splitkernels.eval.calibration_text import calibration_windows
from splitkernels.models import load_packaged
from splitkernels.opsc import decoder_layers

model_name, layer, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
model, tok = load_packaged(model_name)
model.eval()
enc_t = lambda t: tok(t, return_tensors="pt").input_ids[0]  # noqa: E731
calib, _ = calibration_windows(enc_t, 1536, 512, prose_start=8192)
fisher = fisher_diagonal(model, calib, layer)
table = embedding_table(model)
cfg = calibrate_measured(model, list(calib), layer, fisher, wire_dtype=torch.float16)
base = dict(cfg.token_shift)
print("token shifts", {tok.decode([i]): s for i, s in base.items()}, "kmax", cfg.kmax, flush=True)
early = Counter(int(i) for w in calib for i in w[1:128])
frequent = [i for i, _ in early.most_common(16)]
print("frequent early ids", [tok.decode([i]) for i in frequent])
seps = {107: 3, 108: 3, 236743: 3, 236761: 3, 236764: 3}
variants = {"calibrated": base, "none": {},
            "cal + separators 3": {i: max(base.get(i, 0), seps.get(i, 0)) for i in set(base) | set(seps)},
            "cal + frequent16 3": {i: max(base.get(i, 0), 3 if i in frequent else 0) for i in set(base) | set(frequent)}}
layers = decoder_layers(model)
for path in paths:
    ids = enc_t(Path(path).read_text(errors="replace"))
    n = min(4, ids.shape[0] // 512)
    wins = ids[: n * 512].reshape(n, 512)
    with torch.no_grad():
        refs = [torch.log_softmax(model(w[None]).logits[0].float(), -1) for w in wins]
    print(f"{Path(path).name}: {n} windows")
    for name, shifts in variants.items():
        c = dataclasses.replace(cfg, token_shift=tuple(sorted(shifts.items())))
        kls, bits = [], 0
        for w, ref in zip(wins, refs):
            def hook(m, i, o, w=w):
                h = o[0] if isinstance(o, tuple) else o
                e = encode(h[0].half(), c, start=0, tokens=w, embedding=table)
                hook.nbytes = e.nbytes
                y = decode(e, embedding=table).to(h.dtype)[None]
                return (y, *o[1:]) if isinstance(o, tuple) else y
            with torch.no_grad():
                hd = layers[layer - 1].register_forward_hook(hook)
                try:
                    lp = torch.log_softmax(model(w[None]).logits[0].float(), -1)
                finally:
                    hd.remove()
            bits += hook.nbytes * 8 / (512 * cfg.d)
            kls.append(float((ref.exp() * (ref - lp)).sum(-1)[:-1].mean()))
        rest = kls[1:]
        print(f"  {name:20s} bits {bits / n:.3f}  w0 {kls[0]:.4f}  no-BOS mean {sum(rest) / len(rest):.4f} max {max(rest):.4f}"
              f"  all mean {sum(kls) / n:.4f}", flush=True)
