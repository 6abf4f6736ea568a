#!/usr/bin/env bash
# Issue 18, quack FP8 GEMMs in the torch-fp8 step (H200; needs the FA4 bundle `.fa4` staged: it
# carries quack-kernels and the CuTe DSL). Run from the repository root with $OUT set:
#   bash tools/h18q_gpu.sh large|medium|e2e|ao|test|probe|probe-medium
# large/medium: `sd35trt bench` step rows, diffusers eager peer beside ours with and without quack, and
# with the opt-in q/k-norm epilogue (the same compile mode, FA4 attention), --fidelity (cosine vs BF16); e2e: the 28-step 1024² Large
# image, diffusers-module eager peer vs ours as the backend runs it (FA4, quack, FP8 T5); test: the GPU test of
# models/fp8_gemm.py; probe: tools/quack_probe.py (kernel-level table; probe-medium: Medium's shapes, every
# tile config); ao: the Large step with quack beside the torchao peer (its compile ~410 s; ~560 s in all).
# Logs and JSON under $OUT.
set -uo pipefail
: "${OUT:?set OUT}"
cd "$(dirname "$0")/.."
C=fp8-compile-reduce-overhead+fast+gelu+fa4
case "${1:?large|medium|e2e|ao|test|probe|probe-medium}" in
  large|medium) timeout -k 5 560 bash tools/gpu_run.sh bench --preset "sd3.5-$1" \
      --configs "peer-eager,$C,$C+quack,$C+quack+quack-qknorm" --fidelity --json "$OUT/$1.json" 2>&1 | tee "$OUT/$1.log" | tail -12 ;;
  ao) timeout -k 5 590 bash tools/gpu_run.sh bench --preset sd3.5-large \
      --configs "peer-eager,$C+quack,peer-ao" --fidelity --json "$OUT/ao.json" 2>&1 | tee "$OUT/ao.log" | tail -8 ;;
  probe-medium) timeout -k 5 300 bash tools/gpu_run.sh tools/quack_probe.py "$OUT/probe-medium.json" --medium \
      --budget-s 240 2>&1 | tee "$OUT/probe-medium.log" | tail -30 ;;
  e2e) timeout -k 5 420 bash tools/gpu_run.sh bench --preset sd3.5-large --configs e2e --steps 28 \
      --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log" | tail -8 ;;
  test) timeout -k 5 300 bash tools/gpu_run.sh pytest -m gpu -q tests/runtime/models/test_fp8_gemm.py 2>&1 \
      | tee "$OUT/test.log" | tail -5 ;;
  probe) timeout -k 5 300 bash tools/gpu_run.sh tools/quack_probe.py "$OUT/probe.json" --budget-s 240 2>&1 \
      | tee "$OUT/probe.log" | tail -30 ;;
esac
echo "h18q $1 rc=${PIPESTATUS[0]}"
