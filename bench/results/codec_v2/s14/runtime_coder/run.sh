#!/bin/bash
# The runtime's --coder on a long prompt: SmolLM2 demo (split 10, codec v2 defaults), a 600-token
# prompt from vim's todo.txt, rans and auto taking turns, two runs each; prints the prefill frame's
# bits per element, encode and decode times, and the generated tokens.
set -e
OUT=${1:?output folder}
mkdir -p "$OUT"
PROMPT=$(head -c 2600 /usr/share/vim/vim90/doc/todo.txt)
for run in 1 2; do
  for coder in rans auto; do
    splitkernels demo --model smollm2 --split-layer 10 --coder $coder --prompt "$PROMPT" --max-new-tokens 8 \
      --eval-tokens 0 --json > "$OUT/${coder}_$run.json" 2>/dev/null
    python - "$OUT/${coder}_$run.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
g = r["generation"]
p = g["prefill"]
print(f"{sys.argv[1]}: coder {r['codec']['coder']}, prompt {g['prompt_tokens']} tokens, prefill "
      f"{g['bits_per_element_prefill']:.3f} bits/element, encode {p['encode_s'] * 1e3:.2f} ms, "
      f"decode {p['decode_s'] * 1e3:.2f} ms, decode frames {g['bits_per_element_decode']:.3f} bits, tokens {r['tokens']}")
PY
  done
done
