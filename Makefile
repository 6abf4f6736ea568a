# sd35-trt: `make demo` and `make test` set themselves up from nothing (a .venv beside this file).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test
DEMO ?= build/demo
PYTEST_ARGS ?=

.PHONY: demo test test-slow venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU machines here carry a local torch 2.13.0 build; a torch already present is kept.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(STAMP)

# Tiny SD3.5 Medium checkpoint (seconds) -> ModelOpt FP8 calibration + ONNX export -> ONNX Runtime -> PNG.
demo: $(STAMP)
	test -f $(DEMO)/tiny-medium/model_index.json || $(VENV)/bin/sd35trt tiny-model $(DEMO)/tiny-medium --variant medium --seed 0
	$(VENV)/bin/sd35trt export --model $(DEMO)/tiny-medium --out $(DEMO)/onnx-fp8 --precision fp8 --dtype fp32 \
		--calib-size 4 --calib-steps 10
	$(VENV)/bin/sd35trt generate --model $(DEMO)/onnx-fp8 --backend onnxruntime \
		--prompt "a lighthouse on a cliff at golden hour, oil painting" --negative-prompt "blurry" --seed 0 --out $(DEMO)/demo.png

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf build $(VENV)
