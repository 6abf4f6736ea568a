#!/usr/bin/env bash
# Issue 18's torch-fp8 engine-set measurements (2026-12-01), one device call per step:
#   cd .dev-h18 && bash tools/h18_call.sh STEP      (the worktree copied to .dev-h18/, tiny/ beside it:
#   a tiny checkpoint whose tokenizers the set carries; one wheel part carried per call)
#   1 (.fa4/1): text encoders, peer vs T5-XXL real FP8 GEMMs, compiled (tools/text_fp8_probe.py)
#   2 (.fa4/2): build the Large torch-fp8 set, then a fresh process from it (tools/torch_engine_probe.py;
#               a second argument, e.g. --page-cache-warm, goes to the probe)
#   0: stage the carried part only
set -uo pipefail
step=${1:?step 0-2}
PROBE_ARGS=${2:-}
out=${OUT:-/tmp/out}; mkdir -p "$out"
cd "$(dirname "$0")/.."
tiny=$(pwd)/tiny
run() { bash tools/gpu_run.sh "$@"; }
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used,temperature.gpu --format=csv
  run bench --help >/dev/null  # stage the part carried in this call
  (source /tmp/site/env.sh 2>/dev/null; python3 -c "import flash_attn.cute; print('FA4: imports')" 2>&1 | tail -1)
  case $step in
    1) timeout "${TEXT_LIMIT_S:-0}" bash tools/gpu_run.sh tools/text_fp8_probe.py "$out/text.json" "$tiny" ;;  # gpu_run execs python: timeout ends it
    2) run tools/torch_engine_probe.py "$out/engine.json" "$tiny" sd3.5-large ${PROBE_ARGS:-} ;;
    0) echo "staged only" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  nvidia-smi --query-gpu=clocks.sm,memory.used,temperature.gpu --format=csv
} 2>&1 | tee "$out/step$step.log"
