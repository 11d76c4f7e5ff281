#!/usr/bin/env bash
# Same-run A/B of the codec speed bench: the build at the start of session 15 (683d36f, in a git
# worktree with its own C++ build) and this one, taking turns. Usage: run.sh OLD_TREE OUT
set -eu
old="$1"; out="$2"
for i in 1 2; do
  (cd "$old" && PYTHONPATH="$old" python bench/bench_codec_v2.py --out "$out/old$i" --repeats 21)
  python bench/bench_codec_v2.py --out "$out/new$i" --repeats 21
done
