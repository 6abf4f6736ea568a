#!/usr/bin/env bash
# Issue 18 on the H200, one device call per mode (FA4 bundle `.fa4` staged; `.whl/1` for the peers):
#   bash tools/h18r_gpu.sh steps   # the GPU test of models/fp8_gemm.py (q/k-norm epilogue and joint QKV
#                                  # included), then the Large step: eager peer beside ours with quack, with
#                                  # and without the opt-in fusion $FUSION (default quack-joint; its row only
#                                  # when the test passed); --fidelity: cosine vs BF16 (~520 s from a cold
#                                  # inductor cache: first calls took 108-132 s)
#   bash tools/h18r_gpu.sh medium  # the same rows for Medium (~300 s)
#   CFG=<bench config> bash tools/h18r_gpu.sh ao   # the Large step beside the eager and torchao peers (~570 s)
#   TINY=<tiny checkpoint> bash tools/h18r_gpu.sh first   # torch-fp8 set (blocks scope, quack) built here,
#                                  # then the first image of a fresh process from disk (page cache dropped),
#                                  # and once more with the set in the page cache (skipped after 330 s; ~430 s);
#                                  # PRECOMPILE=1: build and fresh processes under TORCH_CACHING_PRECOMPILE=1 (torch's
#                                  # experimental dynamo cache in the same artifacts: no dynamo trace if it holds)
# Logs and JSON under $OUT; each mode ends with "h18r <mode> rc=...".
set -uo pipefail
: "${OUT:?set OUT}"
cd "$(dirname "$0")/.."
C=fp8-compile-reduce-overhead+fast+gelu+fa4+quack
EXTRA=",$C+${FUSION:-quack-joint}"
step_rows() {  # $1 variant, $2 seconds
  timeout -k 5 "$2" bash tools/gpu_run.sh bench --preset "sd3.5-$1" --configs "peer-eager,$C$EXTRA" \
    --fidelity --json "$OUT/$1.json" 2>&1 | grep -v " DEBUG " | tee "$OUT/$1.log" | tail -6
}
case "${1:?steps|medium|ao|first}" in
  steps)
    timeout -k 5 150 bash tools/gpu_run.sh pytest -m gpu -q -p no:warnings tests/runtime/models/test_fp8_gemm.py \
      > "$OUT/test.log" 2>&1
    rc=$?; tail -4 "$OUT/test.log"
    [ "$rc" = 0 ] || EXTRA=""
    step_rows large 420 ;;
  medium) step_rows medium 290 ;;
  ao) timeout -k 5 585 bash tools/gpu_run.sh bench --preset sd3.5-large --configs "peer-eager,${CFG:-$C},peer-ao" \
      --fidelity --json "$OUT/ao.json" 2>&1 | grep -v " DEBUG " | tee "$OUT/ao.log" | tail -6 ;;
  first) [ "${PRECOMPILE:-0}" = 1 ] && export TORCH_CACHING_PRECOMPILE=1
    PROBE_FLAGS="--blocks --no-fallback --page-cache-warm --deadline=${FIRST_WARM_AFTER_S:-330}" \
      timeout -k 5 "${FIRST_LIMIT_S:-430}" bash tools/gpu_run.sh \
      tools/torch_engine_probe.py "$OUT/first.json" "$(realpath "${TINY:?TINY}")" sd3.5-large 2>&1 \
      | grep -v " DEBUG " > "$OUT/first.log"
    python3 tools/h18b_summary.py "$OUT/first.json" 2>&1 | tee "$OUT/first_summary.log" | head -40 ;;
esac
echo "h18r $1 rc=${PIPESTATUS[0]}"
