# sd35-trt: `make demo` and `make test` set themselves up from nothing (a .venv beside this file).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test
DEMO ?= build/demo
PYTEST_ARGS ?=

# `make engines GPU=sm89 MODEL=path [FAMILY=large-turbo] [PRECISION=fp8|fp16|bf16] [DTYPE=fp16|bf16|fp32] [FLAVOR=tensorrt-rtx|tensorrt]`:
# export (build/onnx/<model>-<precision>/, the non-FP8 part in DTYPE, default `sd35trt export`'s fp16)
# then build (engines/<preset or custom-family>-<precision>-<gpu>/). FAMILY only overrides the family
# read from the checkpoint (Large and Large Turbo share one architecture; Turbo engines need no CFG batch).
# FLAVOR=torch-fp8 (run on the GPU itself, e.g. GPU=sm90): the export's FP8 calibration, then
# engines/<preset>-fp8-<gpu>-torch/ (FP8 weights + torch's compile artifacts, `sd35trt build --flavor torch-fp8`);
# COMPILE_SCOPE=blocks compiles its MMDiT per joint block (faster build and first image, slower step; default model).
# CONTROLNET=path: export that ControlNet too (its graph + a transformer taking its residuals); the build then
# makes its engine as well.
GPU ?=
MODEL ?=
FAMILY ?=
PRECISION ?= fp8
DTYPE ?=
FLAVOR ?= tensorrt-rtx
ENGINE_ARGS ?=
COMPILE_SCOPE ?=
CONTROLNET ?=
ONNX_DIR ?= build/onnx/$(notdir $(abspath $(MODEL)))-$(PRECISION)$(if $(CONTROLNET),-$(basename $(notdir $(abspath $(CONTROLNET)))))

.PHONY: demo engines test test-slow venv clean gpu-wheels

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU machines here carry a local torch 2.13.0 build; a torch already present is kept.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(STAMP)

# Tiny SD3.5 Medium checkpoint (seconds) -> ModelOpt FP8 calibration + ONNX export -> ONNX Runtime -> PNG,
# then TensorRT-RTX engines of the same graphs for an RTX 40xx (sm89), built on this CPU (AOT; they run
# only on such a GPU), with the build table.
demo: $(STAMP)
	test -f $(DEMO)/tiny-medium/model_index.json || $(VENV)/bin/sd35trt tiny-model $(DEMO)/tiny-medium --family medium --seed 0
	$(VENV)/bin/sd35trt export --model $(DEMO)/tiny-medium --out $(DEMO)/onnx-fp8 --precision fp8 --dtype fp32 \
		--calib-size 4 --calib-steps 10
	$(VENV)/bin/sd35trt generate --model $(DEMO)/onnx-fp8 --backend onnxruntime \
		--prompt "a lighthouse on a cliff at golden hour, oil painting" --negative-prompt "blurry" --seed 0 --out $(DEMO)/demo.png
	$(VENV)/bin/sd35trt build --onnx $(DEMO)/onnx-fp8 --out $(DEMO)/engines-fp8-sm89 --gpu sm89 --flavor tensorrt-rtx --quiet

engines: $(STAMP)
	@test -n "$(GPU)" -a -n "$(MODEL)" || { echo "usage: make engines GPU=sm89 MODEL=path/to/sd3.5 [FAMILY=large|medium|large-turbo] [PRECISION=fp8|fp16|bf16] [DTYPE=fp16|bf16|fp32] [FLAVOR=tensorrt-rtx|tensorrt|torch-fp8 [COMPILE_SCOPE=model|blocks]] [CONTROLNET=path]"; exit 2; }
	$(VENV)/bin/sd35trt export --model $(MODEL) --out $(ONNX_DIR) --precision $(PRECISION) $(if $(and $(DTYPE),$(filter fp8,$(PRECISION))),--dtype $(DTYPE)) $(if $(CONTROLNET),--controlnet $(CONTROLNET))
	$(if $(filter torch-fp8,$(FLAVOR)),$(VENV)/bin/sd35trt build --model $(MODEL) --calibration $(ONNX_DIR)/calibration,$(VENV)/bin/sd35trt build --onnx $(ONNX_DIR)) --gpu $(GPU) --flavor $(FLAVOR) $(if $(FAMILY),--family $(FAMILY)) $(if $(COMPILE_SCOPE),--compile-scope $(COMPILE_SCOPE)) $(ENGINE_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# Packages the GPU host lacks (it has no package index): FlashAttention-4 and the CuTe DSL into
# .fa4/<k>/, diffusers and torchao (the benchmark's peers) into .whl/<k>/.
gpu-wheels:  # packages the device host lacks, packed for it (one part per device call: tools/gpu_run.sh)
	for d in .fa4 .whl; do grep -qx "/$$d/" .git/info/exclude 2>/dev/null || echo "/$$d/" >> .git/info/exclude; done
	../shared/device/pack .fa4 flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
		nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 \
		apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
	../shared/device/pack .whl diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 torchao==0.18.0

clean:
	rm -rf build $(VENV)
