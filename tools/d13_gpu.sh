#!/usr/bin/env bash
# d13 (issue 13): the image-modes bench on the H200 with the FP8 calibration over whole denoising
# runs (as `sd35trt export` calibrates) and the bf16-vs-fp32 control row. One call, <= 100 s.
#   OUT=... bash tools/d13_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT}"
timeout 98 bash tools/gpu_run.sh bench --preset sd3.5-medium --size 1024 --steps 28 --strength 0.6 --configs modes \
  --json "$OUT/modes.json" 2>&1 | tee "$OUT/d13.log"
rc=${PIPESTATUS[0]}
python3 - "$OUT/modes_modes.json" <<'PY' | tee -a "$OUT/d13.log"
import json, sys
try:
    rows = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(f"no rows: {e}")
print(f"{'row':<62} {'ms':>9} {'cos':>8} {'rel_l2':>7}")
for r in rows:
    print(f"{r['name'][:62]:<62} {r['step_ms']:>9.1f} {r.get('cos_vs_bf16', ''):>8} {r.get('rel_l2', ''):>7}")
PY
echo "d13 bench rc=$rc"
