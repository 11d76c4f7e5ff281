#!/usr/bin/env bash
# Session 23: Qwen2.5-Coder at KL target 0.0010 on session 14's four other texts (vim's todo.txt,
# numpy's ndarraytypes.h, CMake's cmake_path.rst, torch's nn/modules/module.py), every long coder.
# Usage: bench/results/codec_v2/s23/run_qwen_texts.sh OUT
set -euo pipefail
out=${1:?usage: run_qwen_texts.sh OUT}
mkdir -p "$out/qwen_texts"
texts=$(python - <<'PY'
import glob, pathlib, numpy, torch
found = [sorted(glob.glob("/usr/share/vim/vim*/doc/todo.txt"))[-1:],
         [str(pathlib.Path(numpy.get_include()) / "numpy" / "ndarraytypes.h")],
         sorted(glob.glob("/usr/share/cmake*/Help/command/cmake_path.rst"))[-1:],
         [str(pathlib.Path(torch.__file__).parent / "nn" / "modules" / "module.py")]]
print(" ".join(p for group in found for p in group))
PY
)
for text in $texts; do
  name=$(basename "$text" | tr . _)
  python bench/e2e/codec_v2.py --out "$out/qwen_texts/$name" --model qwen2.5-coder --bits measured --uniform-bits \
    --no-baselines --coder slots --also-coders rans rice nibble --eval-file "$text" | tee "$out/qwen_texts/$name.log"
done
