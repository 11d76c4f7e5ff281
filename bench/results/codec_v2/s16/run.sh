#!/usr/bin/env bash
# Session 16: the Rice coder beside rANS and nibble. Usage: bench/results/codec_v2/s16/run.sh OUT
set -euo pipefail
out=${1:?usage: run.sh OUT}
for m in smollm2 gemma3 qwen2.5-coder; do  # bits and quality of Rice-coded 512-token frames
  python bench/e2e/codec_v2.py --out "$out/e2e_rice/$m" --model "$m" --bits measured --uniform-bits \
    --no-baselines --coder rice | tee "$out/e2e_rice/$m.log"
done
for run in run1 run2; do  # speed, every coder in the same run
  python bench/bench_codec_v2.py --out "$out/speed/$run" --repeats 21
done
