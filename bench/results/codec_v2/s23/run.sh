#!/usr/bin/env bash
# Session 23: the measured rule at KL target 0.0010 (was 0.0020). Every long coder's bits, KL and
# perplexity on Botchan (the three families and the massive fixture) and on the GPL-3 text no rule
# was tuned on (SmolLM2, Qwen2.5-Coder). Usage: bench/results/codec_v2/s23/run.sh OUT
set -euo pipefail
out=${1:?usage: run.sh OUT}
here=$(dirname "$0")
bash "$here/run_unseen.sh" "$out"
mkdir -p "$out/e2e"
for m in qwen2.5-coder smollm2 gemma3; do
  python bench/e2e/codec_v2.py --out "$out/e2e/$m" --model "$m" --bits measured --uniform-bits --no-baselines \
    --coder slots --also-coders rans rice nibble | tee "$out/e2e/$m.log"
done
python bench/e2e/codec_v2.py --out "$out/e2e/massive" --model smollm2 --massive 1000 --bits measured --uniform-bits \
  --no-baselines --coder slots --also-coders rans rice nibble | tee "$out/e2e/massive.log"
