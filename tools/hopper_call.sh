#!/usr/bin/env bash
# Issue 18's H200 measurements, one device call per step (each fits one 10-minute command):
#   bash tools/hopper_call.sh STEP        (run from this checkout, or a copy of it such as .hopper/)
# Wheel parts travel one per call (tools/gpu_run.sh stages whatever part it finds): step 1 carries
# .fa4/1, step 2 .fa4/2 and .whl/1; later steps need nothing new while the machine stays warm
# (/tmp, the staged packages and the inductor cache survive between calls then).
# Logs and JSON go to $OUT (at most 8 files come back per call).
set -uo pipefail
step=${1:?step 1-5}
out=${OUT:-/tmp/out}; mkdir -p "$out"
cd "$(dirname "$0")/.."
C=fp8-compile-reduce-overhead+fast+gelu
run() { bash tools/gpu_run.sh "$@"; }
has_fa4() { (source /tmp/site/env.sh 2>/dev/null; python3 -c "import flash_attn.cute" 2>/dev/null); }
log="$out/step$step.log"
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used,temperature.gpu --format=csv
  run bench --help >/dev/null  # stage the parts carried in this call
  if has_fa4; then F="$C+fa4"; echo "FA4: imports"; else F=""; echo "FA4: NOT importable (bundle incomplete?): FA4 rows dropped"; fi
  case $step in
    1) run bench --preset sd3.5-large --configs $C --fidelity --json "$out/s1_large_warm.json" ;;
    2) run pytest -q -m gpu tests/runtime/models/test_flash_attention.py
       run tools/attention_probe.py "$out/attention.json"
       run bench --preset sd3.5-large --configs peer-eager,peer-compile,$C${F:+,$F} --json "$out/large.json" ;;
    3) run bench --preset sd3.5-large --configs peer-eager,$C${F:+,$F},peer-ao --json "$out/large_ao.json" ;;
    4) run bench --preset sd3.5-medium --configs peer-eager,peer-compile,$C${F:+,$F} --json "$out/medium.json" ;;
    5) run bench --preset sd3.5-large --configs text,e2e --steps 28 --json "$out/e2e.json"
       run tools/megacache_probe.py "$out/megacache.json" sd3.5-large ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  nvidia-smi --query-gpu=clocks.sm,memory.used,temperature.gpu --format=csv
} 2>&1 | tee "$log"
