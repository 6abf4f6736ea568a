#!/usr/bin/env bash
# Run an `sd35trt` command on the lent GPU host, which has torch/transformers but no package index
# and no diffusers. Prepare here first: `make gpu-wheels` (wheels into .whl/, git-excluded), then send
# the command with `.whl` carried, e.g.:
#   bash tools/gpu_run.sh bench --variant sd3.5-large --configs peer-eager,peer-compile,fp8-compile-default+fast
# The package is copied onto PYTHONPATH in its import layout (sd35trt/{export,runtime}), so no
# build step is needed there. A first argument ending in .py runs that script instead. Outputs: pass --json "$OUT/x.json" to get files back.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
rm -rf /tmp/pkg && mkdir -p /tmp/pkg
cp -r sd35trt /tmp/pkg/ && cp -r export /tmp/pkg/sd35trt/export && cp -r runtime /tmp/pkg/sd35trt/runtime
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
if [[ "${1:-}" == *.py ]]; then  # a script of this repository instead of the CLI
  script=$(realpath "$1"); shift
  cd /tmp && exec python3 "$script" "$@"
fi
cd /tmp && exec python3 -m sd35trt "$@"
