"""`sd35trt refit`: what is checked before any TensorRT call (the TensorRT part is never executed
here; enterprise TensorRT cannot be installed). Uses the session's TensorRT-RTX engine set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sd35trt.cli import main
from sd35trt.export.refit import refit_plan
from sd35trt.runtime import InvalidInputError


def test_refit_refuses_an_rtx_set(engines_fp8, onnx_fp8: Path, capsys) -> None:
    engines = engines_fp8["sm89"][0]
    with pytest.raises(InvalidInputError, match="tensorrt-rtx engine set; refit needs enterprise TensorRT"):
        refit_plan(engines, onnx_fp8)
    assert main(["refit", "--engines", str(engines), "--onnx", str(onnx_fp8)]) == 2
    assert "refit needs enterprise TensorRT" in capsys.readouterr().err


def test_refit_plan_on_an_enterprise_manifest(engines_fp8, onnx_fp8: Path, onnx_fp32: Path, tmp_path: Path) -> None:
    """The RTX set's manifest with its flavor set to enterprise TensorRT (the engine files are not
    read before TensorRT is imported): unchanged graphs need no refit; another precision is refused."""
    copy = tmp_path / "set"
    shutil.copytree(engines_fp8["sm89"][0], copy)
    doc = json.loads((copy / "manifest.json").read_text())
    doc["flavor"] = "tensorrt"
    (copy / "manifest.json").write_text(json.dumps(doc))
    _, _, todo = refit_plan(copy, onnx_fp8)
    assert todo == {}
    with pytest.raises(InvalidInputError, match="refit only swaps weights"):
        refit_plan(copy, onnx_fp32)
