#!/usr/bin/env bash
# Builds the harness against the tree's csrc/ and runs the layouts and instruction sets.
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../../../../.."
g++ -O3 -std=c++17 -I"$root/csrc" "$here/rans_harness.cpp" -o /tmp/rans_harness
for k in 16 1 0; do
  for args in "4 scalar" "32 scalar" "32 avx512"; do /tmp/rans_harness $k $args; done
done
