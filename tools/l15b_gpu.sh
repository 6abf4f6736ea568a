#!/usr/bin/env bash
# Issue 15's GPU measurement in one go (H200, no wheel parts needed): LoRA side-path variants,
# fuse=True alternating with no LoRA, full-depth one-step cosines. Run from the repository root
# with $OUT set: `bash tools/l15b_gpu.sh`. Writes $OUT/l15b.json and $OUT/l15b.log; the JSON is
# rewritten after every row, so a timeout still leaves the rows done. Wall cap 170 s.
set -uo pipefail
: "${OUT:?set OUT}"
cd "$(dirname "$0")/.."
timeout -k 5 165 bash tools/gpu_run.sh "$PWD/tools/lora_bench.py" "$OUT/l15b.json" --blocks 4 --budget-s 135 \
  2>&1 | tee "$OUT/l15b.log"
rc=${PIPESTATUS[0]}
echo "l15b rc=$rc"
exit "$rc"
