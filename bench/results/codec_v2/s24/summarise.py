"""Markdown rows of session 24's e2e runs (per-frame rate control): per model, text and split, the
512-token frames' bits (rANS, the coder the control ran on; the others at the scale it chose), the
one-token frames' bits, KL and perplexity change of both reconstructions, and the mean frame scale.
Usage: python bench/results/codec_v2/s24/summarise.py [ROOT...]"""
import json
import sys
from pathlib import Path

roots = [Path(p) for p in sys.argv[1:]] or [Path(__file__).parent]
print("| model | text | split | rANS 512 | slots / Rice / nibble 512 | one-token | KL 512 | ppl 512 | KL 1-token | ppl 1-token | mean scale |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for root in roots:
    for f in sorted(root.glob("**/results.json")):
        r = json.loads(f.read_text())
        text = Path(r["eval_text"]).name
        for row in r["rows"]:
            if "kl_1" not in row:
                continue
            c = row.get("bits_512_by_coder", {})
            others = " / ".join(f"{c[k]:.3f}" for k in ("slots", "rice", "nibble") if k in c)
            print(f"| {r['model']} | {text} | {row['layer']} | {row['bits_512']:.3f} | {others} | {row['bits_1']:.3f} | "
                  f"{row['kl']:.4f} | {100 * row['ppl_change']:+.2f}% | {row['kl_1']:.4f} | {100 * row['ppl_change_1']:+.2f}% | "
                  f"{row['scales']['mean']:+.2f} |")
