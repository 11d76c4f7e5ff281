"""Markdown rows of the session's e2e runs: per model, text and split, the 512-token bits of each
coder, the one-token bits, KL and perplexity change, at KL target 0.0020 (kl0020/) and 0.0010
(kl0010/). Usage: python bench/results/codec_v2/s23/summarise.py [ROOT]"""
import json
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
print("| target | model | text | split | slots | rANS | Rice | nibble | one-token | KL | perplexity |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for f in sorted(root.glob("kl00*/**/results.json")):
    r = json.loads(f.read_text())
    text = Path(r["eval_text"]).name
    for row in r["rows"]:
        c = row.get("bits_512_by_coder", {})
        print(f"| {f.relative_to(root).parts[0][2:].replace('00', '0.00', 1)} | {r['model']} | {text} | {row['layer']} | "
              f"{row['bits_512']:.3f} | {c.get('rans', float('nan')):.3f} | {c.get('rice', float('nan')):.3f} | "
              f"{c.get('nibble', float('nan')):.3f} | {row['bits_1']:.3f} | {row['kl']:.4f} | {100 * row['ppl_change']:+.2f}% |")
