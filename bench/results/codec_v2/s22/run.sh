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
# The same without center offsets (no frame carries any when MIN_TOKENS is out of reach).
python - "$out" <<'PY'
import pathlib, runpy, sys
import numpy
import splitkernels.codec.frame_center as frame_center
frame_center.MIN_TOKENS = 1 << 30
text = pathlib.Path(numpy.get_include()) / "numpy" / "ndarraytypes.h"
sys.argv = ["bench/e2e/codec_v2.py", "--out", f"{sys.argv[1]}/e2e_unseen/gemma3_ndarraytypes_no_offsets", "--model",
            "gemma3", "--bits", "measured", "--uniform-bits", "--no-baselines", "--coder", "slots", "--also-coders",
            "rans", "rice", "nibble", "--eval-file", str(text)]
runpy.run_path("bench/e2e/codec_v2.py", run_name="__main__")
PY
