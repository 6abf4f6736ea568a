#!/usr/bin/env bash
# Issue 17's GPU line in one device call: one CFG step (batch 2, 1024²) of SD3.5 Large with a
# ControlNet of the released size, ours torch-fp8 (joint max calibration, compiled reduce-overhead
# + fast accumulation + sigmoid GELU) vs diffusers eager BF16 with the same tensors, one process:
#   bash tools/control_call.sh        (from this checkout or a copy of it such as .dev-c17g/)
# Carry .whl/1 (diffusers). When the FlashAttention-4 bundle is already staged on the warm machine
# (.fa4/1 then .fa4/2 carried by earlier calls), ours runs with the FA4 core (+fa4), else cuDNN
# SDPA; CONTROL_FA4=off forces cuDNN. One compiled config only (the compile is most of the time).
# Writes $OUT/bench_control.json (rows + summary) and $OUT/control.log.
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
cd "$(dirname "$0")/.."
C=fp8-compile-reduce-overhead+fast+gelu
has_fa4() { (source /tmp/site/env.sh 2>/dev/null; python3 -c "import flash_attn.cute" 2>/dev/null); }
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used,temperature.gpu --format=csv
  bash tools/gpu_run.sh bench --help >/dev/null  # stage the wheel parts carried in this call
  if [ "${CONTROL_FA4:-auto}" != off ] && has_fa4; then C="$C+fa4"; echo "FA4: imports"; else echo "FA4: not used"; fi
  start=$(date +%s)
  bash tools/gpu_run.sh bench --preset sd3.5-large --configs "control:$C" --json "$out/bench.json"
  echo "rc=$? wall $(( $(date +%s) - start )) s"
  nvidia-smi --query-gpu=clocks.sm,memory.used,temperature.gpu --format=csv
} 2>&1 | tee "$out/control.log"
