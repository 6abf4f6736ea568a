#!/usr/bin/env bash
# Issue 18 item 2, one GPU call (H200; wheel parts: whatever tools/gpu_run.sh staged, FA4 `.fa4` if
# the lead carried it; without FA4 the rows run cuDNN SDPA and the JSON's `attention` says so).
# The torch-fp8 step on the first 6 SD3.5 Large blocks (1024², CFG batch 2), compiled as the runtime
# does (reduce-overhead), baseline then each opt-in fusion of runtime/backends/fp8_fusions.py, the
# best combination, and a no-CUDA-graph profile of baseline vs best (tools/step_fusions.py).
# Run from the repository root with $OUT set: `bash tools/h18s_gpu.sh`. Writes $OUT/h18s.json
# (rewritten after every row) and $OUT/h18s.log. Wall cap 280 s including compiles.
set -uo pipefail
: "${OUT:?set OUT}"
cd "$(dirname "$0")/.."
timeout -k 5 270 bash tools/gpu_run.sh "$PWD/tools/step_fusions.py" "$OUT/h18s.json" --blocks 6 --budget-s 240 \
  2>&1 | tee "$OUT/h18s.log"
rc=${PIPESTATUS[0]}
echo "h18s rc=$rc"
exit "$rc"
