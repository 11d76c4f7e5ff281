#!/usr/bin/env bash
# Session 19: the bit-plane Rice coder (coder 4) beside rANS, Rice and nibble. Usage: bench/results/codec_v2/s19/run.sh OUT
set -euo pipefail
out=${1:?usage: run.sh OUT}
for m in smollm2 gemma3 qwen2.5-coder; do  # bits and quality of bit-plane-coded 512-token frames
  python bench/e2e/codec_v2.py --out "$out/e2e_planes/$m" --model "$m" --bits measured --uniform-bits \
    --no-baselines --coder planes | tee "$out/e2e_planes/$m.log"
done
for run in run1 run2; do  # speed, every coder in the same run
  python bench/bench_codec_v2.py --out "$out/speed/$run" --repeats 21
done
