#!/usr/bin/env bash
# Run an `sd35trt` command on the lent GPU host, which has torch/transformers but no package index
# and no diffusers/torchao/FA4. Prepare here first: `make gpu-wheels` packs them with
# ../shared/device/pack into .fa4/<k>/ (FlashAttention-4 and the CuTe DSL, 2 parts) and .whl/<k>/
# (diffusers, torchao: 1 part), all git-excluded. A call carries at most 64 MiB, so send one part
# per call, back to back while the machine is warm; each call runs this script, which stages the
# parts it finds (in this checkout or the one above it, when run from a copy such as .hopper/) and,
# once a bundle is whole, puts it on PYTHONPATH (/tmp/site/env.sh). E.g.:
#   bash tools/gpu_run.sh bench --preset sd3.5-large --configs peer-eager,fp8-compile-reduce-overhead+fast+gelu+fa4
# The package is copied onto PYTHONPATH in its import layout (sd35trt/{export,runtime}), so no
# build step is needed there. A first argument ending in .py runs that script instead; `pytest`
# runs pytest on this checkout's tests in that layout. Outputs: pass --json "$OUT/x.json".
set -euo pipefail
cd "$(dirname "$0")/.."
for part in ./.fa4/*/stage.sh ./.whl/*/stage.sh ../.fa4/*/stage.sh ../.whl/*/stage.sh; do
  [ -f "$part" ] && bash "$part"
done
rm -rf /tmp/pkg && mkdir -p /tmp/pkg
cp -r sd35trt /tmp/pkg/ && cp -r export /tmp/pkg/sd35trt/export && cp -r runtime /tmp/pkg/sd35trt/runtime
cp -r calib_prompts /tmp/pkg/sd35trt/calib_prompts && cp -r tests pyproject.toml /tmp/pkg/
if [ -f /tmp/site/env.sh ]; then
  source /tmp/site/env.sh
  # seen through a .../site-packages/ path, as pip would install them: quack's epilogue fingerprint
  # treats code under site-packages as pinned by its distribution and does not recurse into it
  mkdir -p /tmp/sp && ln -sfn /tmp/site /tmp/sp/site-packages
  export PYTHONPATH=${PYTHONPATH//\/tmp\/site/\/tmp\/sp\/site-packages}
fi
export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [[ "${1:-}" == *.py ]]; then  # a script of this repository instead of the CLI
  script=$(realpath "$1"); shift
  cd /tmp && exec python3 "$script" "$@"
fi
if [[ "${1:-}" == pytest ]]; then shift; cd /tmp/pkg && exec python3 -m pytest -p no:cacheprovider "$@"; fi
cd /tmp && exec python3 -m sd35trt "$@"
