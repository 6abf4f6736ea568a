#!/usr/bin/env bash
# Issue 18 (helper h18b), one device call on a fresh machine with FA4 staged (/tmp/site/env.sh):
# build the Large torch-fp8 engine set with the MMDiT compiled per joint block
# (compile_scope=blocks), then time a fresh process from it after drop_caches (cold) and once more
# with the set in the page cache (warm), each with its first-image breakdown and step median.
#   OUT=... TINY=<tiny checkpoint folder, for its tokenizers> bash tools/h18b_gpu.sh
# Writes $OUT/h18b.json (the probe's rows) and $OUT/h18b.log; prints a summary at the end.
# H18B_LIMIT_S (default 285 s) bounds the probe (killed with its children after it); it skips the
# warm process once H18B_WARM_AFTER_S (default 210) seconds have gone. Whole script <= 300 s.
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
cd "$(dirname "$0")/.."
tiny=$(realpath "${TINY:?TINY: a tiny checkpoint folder whose tokenizers the set carries}")  # gpu_run.sh runs from /tmp
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used,temperature.gpu --format=csv
  (source /tmp/site/env.sh 2>/dev/null; python3 -c "import flash_attn.cute; print('FA4: imports')" 2>&1 | tail -1)
  PROBE_FLAGS="--blocks --no-fallback --page-cache-warm --deadline=${H18B_WARM_AFTER_S:-210}" \
    timeout -k 5 "${H18B_LIMIT_S:-285}" bash tools/gpu_run.sh tools/torch_engine_probe.py "$out/h18b.json" "$tiny" sd3.5-large
  echo "probe rc=$?"
  python3 tools/h18b_summary.py "$out/h18b.json"
} 2>&1 | grep -v " DEBUG " | tee "$out/h18b.log"
