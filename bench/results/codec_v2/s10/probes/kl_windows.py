"""Where the KL of a split comes from: per window (with/without BOS) and per position band, and what
sending some tokens exact would change."""
import sys, torch, numpy as np
from pathlib import Path
from splitkernels.models import load_packaged
from splitkernels.opsc import decoder_layers
from splitkernels.codec import encode, decode
from splitkernels.codec.measured import calibrate_measured
from splitkernels.codec.sensitivity import fisher_diagonal
from splitkernels.eval.calibration_text import calibration_windows
from splitkernels.cli.models import wire_dtype_for

model_name, layer, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model, tok = load_packaged(model_name); model.eval()
enc_t = lambda t: tok(t, return_tensors="pt").input_ids[0]
calib, _ = calibration_windows(enc_t, 1536, 512, prose_start=8192)
fisher = fisher_diagonal(model, calib, layer)
wire = torch.float16
cfg = calibrate_measured(model, list(calib), layer, fisher, wire_dtype=wire)
ids = enc_t(Path(path).read_text())[:1024].reshape(2, 512)
print("first ids", ids[:, 0].tolist(), "bos", tok.bos_token_id, "shifts", cfg.position_shift)
layers = decoder_layers(model)
def run(w, exact=None):
    def hook(m, i, o):
        h = o[0] if isinstance(o, tuple) else o
        x = h[0].to(wire)
        y = torch.cat([decode(encode(x[t:t+1], cfg, start=t)) for t in range(x.shape[0])]).to(h.dtype)
        if exact is not None:
            y[exact] = h[0][exact]
        y = y[None]
        return (y, *o[1:]) if isinstance(o, tuple) else y
    hd = layers[layer - 1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(w[None]).logits[0].float()
    finally:
        hd.remove()
for wi, w in enumerate(ids):
    with torch.no_grad():
        ref = torch.log_softmax(model(w[None]).logits[0].float(), -1)
    strs = [tok.decode([int(i)]) for i in w]
    nl = torch.tensor(["\n" in s for s in strs])
    for name, exact in (("codec", None), ("pos<64 exact", torch.arange(512) < 64), ("newlines exact", nl)):
        lp = torch.log_softmax(run(w, exact), -1)
        kl = (ref.exp() * (ref - lp)).sum(-1)[:-1]
        bands = [float(kl[a:b].sum()) / 511 for a, b in ((0, 32), (32, 64), (64, 128), (128, 256), (256, 511))]
        print(f"window {wi} {name:15s} KL {float(kl.mean()):.4f}  by output band <32,<64,<128,<256,<511: " + " ".join(f"{v:.4f}" for v in bands))
