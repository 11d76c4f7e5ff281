"""Session 23 probe: which tokens carry the KL on the GPL-3 text, and how sure the perplexity change is.

    python bench/results/codec_v2/s23/probe/token_kl.py MODEL LAYER [LAYER ...]

As bench/e2e/codec_v2.py (mixed calibration windows, the measured rule, rANS frames, 1022 scored
tokens of /usr/share/common-licenses/GPL-3 or $TEXT), at KL targets 0.0020 and 0.0010: the KL, the
share of it carried by the 10 worst tokens, and the perplexity change with its 95% interval from
bench/e2e/stats.py (bootstrap over windows of scored tokens).
"""
import os
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[5] / "bench" / "e2e"), str(Path(__file__).resolve().parents[5] / "bench")]
import codec_v2 as harness  # noqa: E402
from stats import ppl_change_ci  # noqa: E402

from splitkernels.codec.measured import calibrate_measured  # noqa: E402
from splitkernels.codec.sensitivity import fisher_diagonal  # noqa: E402
from splitkernels.eval.calibration_text import calibration_windows  # noqa: E402
from splitkernels.planner import quality  # noqa: E402

model_name, layers = sys.argv[1], [int(v) for v in sys.argv[2:]]
torch.manual_seed(0)
loaded = harness.load_model(model_name)
model, tok = loaded.model.eval(), loaded.tokenizer
encode_ids = lambda t: tok(t, return_tensors="pt").input_ids[0]  # noqa: E731
calib, _ = calibration_windows(encode_ids, 1536, harness.CONTEXT, prose_start=harness.CALIB_OFFSET)
text = Path(os.environ.get("TEXT", "/usr/share/common-licenses/GPL-3")).read_text(encoding="utf-8")
with torch.no_grad():
    ev = quality.SplitEvaluator(model, encode_ids(text)[:1024], harness.CONTEXT)
captured = {}
compare = quality.compare_logits


def capture(ref, cand, targets):
    captured["kl"] = torch.nn.functional.kl_div(cand.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                                reduction="none").sum(-1)
    return compare(ref, cand, targets)


quality.compare_logits = capture
wires = harness.wire_dtypes(model, calib, layers)
table = harness.embedding_table(model)
for layer in layers:
    fisher = fisher_diagonal(model, calib, layer)
    for target in (0.0020, 0.0010):
        cfg = calibrate_measured(model, list(calib), layer, fisher, wire_dtype=wires[layer], max_kl=target)
        with torch.no_grad():
            p = ev.measure(layer, None, None, None, harness.Recorder(harness.v2_transform(cfg, wires[layer], lambda: ev.current_ids, table)))
        kl = captured["kl"]
        top = kl.topk(10)
        _, lo, hi = ppl_change_ci(ev.reference_nll, ev.last_nll)
        print(f"{model_name} l={layer} target {target}: KL {p.kl:.4f} (10 worst tokens carry {100 * float(top.values.sum() / kl.sum()):.0f}%,"
              f" worst {float(top.values[0]):.3f} at {top.indices[0].item()}), ppl {100 * p.ppl_change:+.2f}%"
              f" (95% interval {100 * lo:+.2f}% .. {100 * hi:+.2f}%), bits {p.bits_per_element:.3f}", flush=True)
