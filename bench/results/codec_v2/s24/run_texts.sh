#!/usr/bin/env bash
# Session 24: the measured rule with per-frame rate control on session 14's four other texts (vim's
# todo.txt, numpy's ndarraytypes.h, CMake's cmake_path.rst, torch's nn/modules/module.py), default
# coder. Usage: bench/results/codec_v2/s24/run_texts.sh OUT [MODEL...] (default qwen2.5-coder)
set -euo pipefail
out=${1:?usage: run_texts.sh OUT [MODEL...]}
shift
models=${*:-qwen2.5-coder}
mkdir -p "$out"
texts=$(python bench/e2e/unseen_texts.py)
for m in $models; do
  for text in $texts; do
    name=${m}_$(basename "$text" | tr . _)
    python bench/e2e/codec_v2.py --out "$out/$name" --model "$m" --bits measured --uniform-bits --no-baselines \
      --also-coders slots rice nibble --eval-file "$text" | grep -v "Loading weights" | tee "$out/$name.log"
  done
done
