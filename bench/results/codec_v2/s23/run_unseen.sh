#!/usr/bin/env bash
# Session 23: SmolLM2 and Qwen2.5-Coder on a text no rule was tuned on (the GPL-3 text Debian ships
# in /usr/share/common-licenses: legal English, where the rules were fitted on Botchan's fiction),
# every long coder, the measured rule. Usage: bench/results/codec_v2/s23/run_unseen.sh OUT
set -euo pipefail
out=${1:?usage: run_unseen.sh OUT}
text=${TEXT:-/usr/share/common-licenses/GPL-3}
mkdir -p "$out/e2e_unseen"
for m in smollm2 qwen2.5-coder; do
  python bench/e2e/codec_v2.py --out "$out/e2e_unseen/${m}_gpl3" --model "$m" --bits measured --uniform-bits \
    --no-baselines --coder slots --also-coders rans rice nibble --eval-file "$text" | tee "$out/e2e_unseen/${m}_gpl3.log"
done
