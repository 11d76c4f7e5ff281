#!/usr/bin/env bash
# Session 24: the measured rule with per-frame rate control (splitkernels/codec/rate.py) on every
# family, on Botchan and on the GPL-3 text Debian ships (a register no rule was tuned on). The
# 512-token frames take the default coder (rANS; the others recorded at the scale it chose); the
# one-token frames are a session of their own after it, and their reconstruction is scored too
# (kl_1, ppl_change_1). Usage: bench/results/codec_v2/s24/run.sh OUT [MODEL...]
set -euo pipefail
out=${1:?usage: run.sh OUT [MODEL...]}
shift
models=("${@:-smollm2 qwen2.5-coder gemma3 massive}")
gpl=/usr/share/common-licenses/GPL-3
mkdir -p "$out"
for m in ${models[@]}; do
  for text in gpl3 botchan; do
    [ "$m" = massive ] && [ "$text" = gpl3 ] && continue
    args=(--model "$m")
    [ "$m" = massive ] && args=(--model smollm2 --massive 1000)
    [ "$text" = gpl3 ] && args+=(--eval-file "$gpl")
    python bench/e2e/codec_v2.py --out "$out/${m}_$text" "${args[@]}" --bits measured --uniform-bits \
      --no-baselines --also-coders slots rice nibble | grep -v "Loading weights" | tee "$out/${m}_$text.log"
  done
done
