#!/usr/bin/env bash
# Session 23: Qwen2.5-Coder at KL target 0.0010 on session 14's four other texts (vim's todo.txt,
# numpy's ndarraytypes.h, CMake's cmake_path.rst, torch's nn/modules/module.py), every long coder.
# Usage: bench/results/codec_v2/s23/run_qwen_texts.sh OUT
set -euo pipefail
out=${1:?usage: run_qwen_texts.sh OUT}
mkdir -p "$out/qwen_texts"
texts=$(python bench/e2e/unseen_texts.py)
for text in $texts; do
  name=$(basename "$text" | tr . _)
  python bench/e2e/codec_v2.py --out "$out/qwen_texts/$name" --model qwen2.5-coder --bits measured --uniform-bits \
    --no-baselines --coder slots --also-coders rans rice nibble --eval-file "$text" | tee "$out/qwen_texts/$name.log"
done
