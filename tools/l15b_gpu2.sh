#!/usr/bin/env bash
# Issue 15, second window (<= 120 s): the splitk side path (down-projection K folded into M) at
# rank 64 and 16 vs no LoRA and delta, plus an eager torch.profiler kernel table per step (no
# LoRA, delta, splitk) to show where the side path's time goes; full-depth cosines incl. splitk.
# Run from the repository root with $OUT set: `bash tools/l15b_gpu2.sh`. Writes $OUT/l15b2.json
# and $OUT/l15b2.log (JSON rewritten after every row). No wheel parts needed.
set -uo pipefail
: "${OUT:?set OUT}"
cd "$(dirname "$0")/.."
timeout -k 5 112 bash tools/gpu_run.sh "$PWD/tools/lora_bench.py" "$OUT/l15b2.json" --blocks 4 --budget-s 88 \
  --plan plain,splitk:64,profile,splitk:16,delta:64 2>&1 | tee "$OUT/l15b2.log"
rc=${PIPESTATUS[0]}
echo "l15b2 rc=$rc"
exit "$rc"
