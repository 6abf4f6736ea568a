#!/usr/bin/env bash
# Issue 16 (helper m16b), one device window: memory='low' peaks on the H200 after the FP8 view-weight
# fix and T5 block streaming, then the -m gpu memory test. Run from the repository root on the GPU
# host with .whl/1 (diffusers + torchao, for the test's tiny checkpoint) carried:
#   OUT=... bash tools/m16b_gpu.sh            (CAP=165: the first window)
#   OUT=... CAP=58 bash tools/m16b_gpu.sh retest   (the -m gpu test, then Medium+T5 low alone)
# Steps (each under `timeout`, all inside CAP seconds, default 165):
#   Large + T5 default,low | Medium + T5 default,low | Medium no T5 low   (1024², 28 steps, torch-fp8,
#   eager, `sd35trt bench --configs e2e --memory ... --memory-repeats 0`: one whole image per mode, a
#   new prompt through every stage: the peak; no time rows, those were measured this morning)
#   pytest -m gpu tests/runtime/test_memory_gpu.py
# GPU_RUN replaces `bash tools/gpu_run.sh` (a CPU dry run of the plumbing).
# Writes $OUT/m16b.log and $OUT/m16b.json (the bench rows, with each stage's weights and peak).
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
cap=${CAP:-165}
t0=$SECONDS
step() {  # name, limit s, gpu_run.sh arguments...
  local name=$1 lim=$2 left; shift 2
  left=$(( cap - (SECONDS - t0) )); (( left < lim )) && lim=$left
  if (( lim < 15 )); then echo "== $name: SKIPPED (${left}s left of ${cap}s)"; return; fi
  echo "== $name (limit ${lim}s)"
  timeout -k 5 "$lim" ${GPU_RUN:-bash tools/gpu_run.sh} "$@"  # gpu_run execs python: timeout ends it
  echo "== $name rc=$? at $((SECONDS - t0))s"
}
bench() { step "$1" "$2" bench --configs e2e --size 1024 --steps 28 --memory-repeats 0 "${@:3}"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
  if [[ "${1:-}" == retest ]]; then  # second window: the -m gpu test, then Medium low's per-stage peaks
    step gpu-test 30 pytest -q -x -rs -s -m gpu tests/runtime/test_memory_gpu.py
    bench medium-t5-low 40 --preset sd3.5-medium --memory low --json "$tmp/medium.json"
    python3 tools/m16b_summary.py "$out/m16b.json" "$tmp"/*_memory.json
    echo "wall $((SECONDS - t0))s"
    exit 0
  fi
  bench large-t5 85 --preset sd3.5-large --memory default,low --json "$tmp/large.json"
  bench medium-t5 40 --preset sd3.5-medium --memory default,low --json "$tmp/medium.json"
  bench medium-no-t5 30 --preset sd3.5-medium --memory low --no-t5 --json "$tmp/medium_no_t5.json"
  step gpu-test 45 pytest -q -x -rs -s -m gpu tests/runtime/test_memory_gpu.py
  python3 tools/m16b_summary.py "$out/m16b.json" "$tmp"/*_memory.json
  echo "wall $((SECONDS - t0))s"
} 2>&1 | tee "$out/m16b.log"
rm -rf "$tmp"
