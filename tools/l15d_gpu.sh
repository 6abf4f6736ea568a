#!/usr/bin/env bash
# Issue 15, the side path's cost after the joined-K rework (catk: K_cat 128-aligned, custom ops for
# the down-projection and the joins). One call, <= 170 s: full-depth fidelity of every variant and
# fuse=True, then on 4 Large blocks: no LoRA, catk rank 16 and 64 each alternating with no LoRA,
# and catk with the runtime's default bank (2 slots x 64) alternating.
# Run from the repository root with $OUT set. Writes $OUT/l15d.json, $OUT/l15d_kernels.json, $OUT/l15d.log.
set -uo pipefail
: "${OUT:?set OUT}"
cd "$(dirname "$0")/.."
timeout -k 5 175 bash tools/gpu_run.sh "$PWD/tools/lora_bench.py" "$OUT/l15d.json" --blocks 4 --budget-s 115 \
  --plan plain,alt:catk:16,alt:catk:64,alt:catk:64x2 2>&1 | grep -v -i warn | tee "$OUT/l15d.log"
rc=${PIPESTATUS[0]}
echo "l15d rc=$rc"
exit "$rc"
