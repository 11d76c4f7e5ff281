#!/usr/bin/env bash
# Session 22: center offsets in long frames; bits of every long coder on the three families and the
# massive fixture. Usage: bench/results/codec_v2/s22/run.sh OUT
set -euo pipefail
out=${1:?usage: run.sh OUT}
mkdir -p "$out/e2e"
for m in gemma3 smollm2 qwen2.5-coder; do
  python bench/e2e/codec_v2.py --out "$out/e2e/$m" --model "$m" --bits measured --uniform-bits --no-baselines \
    --coder slots --also-coders rans rice nibble | tee "$out/e2e/$m.log"
done
python bench/e2e/codec_v2.py --out "$out/e2e/massive" --model smollm2 --massive 1000 --bits measured --uniform-bits \
  --no-baselines --coder slots --also-coders rans rice nibble | tee "$out/e2e/massive.log"
# A text no rule was tuned on (session 13's numpy header), Gemma 3, every coder.
mkdir -p "$out/e2e_unseen"
python bench/e2e/codec_v2.py --out "$out/e2e_unseen/gemma3_ndarraytypes" --model gemma3 --bits measured --uniform-bits \
  --no-baselines --coder slots --also-coders rans rice nibble \
  --eval-file "$(python -c 'import numpy, pathlib; print(pathlib.Path(numpy.get_include()) / "numpy" / "ndarraytypes.h")')" \
  | tee "$out/e2e_unseen/gemma3_ndarraytypes.log"
