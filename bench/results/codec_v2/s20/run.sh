#!/usr/bin/env bash
# Session 20: the slot coder (coder 5) beside rANS, Rice, bit planes and nibble. Usage: bench/results/codec_v2/s20/run.sh OUT
set -euo pipefail
out=${1:?usage: run.sh OUT}
for m in smollm2 gemma3 qwen2.5-coder; do  # bits and quality of slot-coded 512-token frames
  python bench/e2e/codec_v2.py --out "$out/e2e_slots/$m" --model "$m" --bits measured --uniform-bits \
    --no-baselines --coder slots | tee "$out/e2e_slots/$m.log"
done
for coder in slots rice; do  # the massive-activation fixture, slots beside Rice
  python bench/e2e/codec_v2.py --out "$out/e2e_massive/$coder" --model smollm2 --massive 1000 --bits measured \
    --uniform-bits --no-baselines --coder "$coder" | tee "$out/e2e_massive/$coder.log"
done
for run in run1 run2; do  # speed, every coder in the same run
  python bench/bench_codec_v2.py --out "$out/speed/$run" --repeats 21
done
