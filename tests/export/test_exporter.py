"""`sd35trt export`: summary table, no work on re-run, nothing trusted after an interruption."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sd35trt.cli import main
from sd35trt.export.exporter import ExportOptions, export_model
from sd35trt.runtime import InvalidInputError
from sd35trt.runtime.components import component
from sd35trt.runtime.config import VariantConfig
from sd35trt.runtime.manifest import HASH_CACHE

pytest.importorskip("onnxruntime", reason="onnxruntime (test extra) folds constants")


def test_cli_export_then_rerun_does_nothing(tiny_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "onnx"
    argv = ["export", "--model", str(tiny_models["large"]), "--out", str(out), "--precision", "fp8",
            "--calib-size", "2", "--calib-steps", "3", "--quiet"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    for comp in ("clip_l", "clip_g", "t5", "transformer", "vae_decoder", "vae_encoder"):
        assert comp in first
    assert "6 exported" in first and "fp8" in first
    mtimes = {p.name: p.stat().st_mtime_ns for p in [*out.glob("*.onnx"), *out.glob("calibration/*.safetensors")]}
    assert "t5_amax.safetensors" in mtimes  # T5's calibration beside the MMDiT's (torch-fp8's FP8 T5 GEMMs)
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "0 exported, 6 unchanged" in second
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in [*out.glob("*.onnx"), *out.glob("calibration/*.safetensors")]}


def test_interrupted_component_is_redone(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    opts = ExportOptions(precision="fp32", vae_encoder=False)
    export_model(tiny_models["large"], out, opts, progress=False)
    # simulate a crash that left a truncated graph behind: its hash no longer matches the manifest
    (out / "vae_decoder.onnx").write_bytes((out / "vae_decoder.onnx").read_bytes()[:100])
    rows = {r.component: r.status for r in export_model(tiny_models["large"], out, opts, progress=False)}
    assert rows["vae_decoder"] == "exported" and rows["transformer"] == "cached"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["components"]["vae_decoder"]["bytes"] > 1000
    assert [p for p in os.listdir(out) if p.startswith(".")] == [HASH_CACHE]  # no temp files left


def _velocity(folder: Path, model: Path) -> np.ndarray:
    """The exported transformer graph (fp16) on ONNX Runtime, for the table's tracing inputs."""
    import onnxruntime as ort

    args = component("transformer").sample_inputs(VariantConfig.from_checkpoint(model), torch.float16)
    sess = ort.InferenceSession(str(folder / "transformer.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {n: a.numpy() for n, a in zip(component("transformer").input_names, args)})[0]


def test_export_without_t5_then_a_changed_weight_reexports_only_its_component(tiny_models: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    model, out = Path(shutil.copytree(tiny_models["turbo"], tmp_path / "turbo")), tmp_path / "onnx"
    opts = ExportOptions(precision="fp16", t5=False, vae_encoder=False)
    rows = export_model(model, out, opts, progress=False)
    assert [r.component for r in rows] == ["clip_l", "clip_g", "transformer", "vae_decoder"]
    assert {r.precision for r in rows} == {"fp16"} and not (out / "t5.onnx").exists()
    before, mtimes = _velocity(out, model), {p.name: p.stat().st_mtime_ns for p in out.glob("*.onnx")}
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["proj_out.bias"] = state["proj_out.bias"] + 0.5  # adds 0.5 to every velocity element
    save_file(state, weights, metadata={"format": "pt"})
    rows = export_model(model, out, opts, progress=False)
    assert {r.component: r.status for r in rows} == {"clip_l": "cached", "clip_g": "cached", "transformer": "exported",
                                                     "vae_decoder": "cached"}
    assert {n: t for n, t in mtimes.items() if n != "transformer.onnx"} == {
        p.name: p.stat().st_mtime_ns for p in out.glob("*.onnx") if p.name != "transformer.onnx"}
    shift = _velocity(out, model).astype(np.float32) - before.astype(np.float32)  # [2, 16, 8, 12]
    assert np.abs(shift - 0.5).max() <= 1e-2  # seen 9.8e-4 (fp16 rounding, |v| <= 1.9): the graph has the new bias


def test_bad_precision_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="precision='int4'"):
        ExportOptions(precision="int4")


def test_single_file_layout_exports_the_same_model(tiny_medium: Path, onnx_fp32: Path, tmp_path: Path) -> None:
    from sd35trt.export.single_file import write_single_file
    from sd35trt.runtime import Pipeline

    model_file = write_single_file(tiny_medium, tmp_path / "sf")
    out = tmp_path / "onnx"
    rows = export_model(model_file, out, ExportOptions(precision="fp32"), progress=False)
    assert {r.component for r in rows} == {"clip_l", "clip_g", "t5", "transformer", "vae_decoder", "vae_encoder"}
    kw = dict(prompt="a red bicycle", height=64, width=64, num_inference_steps=4, guidance_scale=3.0, output_type="np")
    a = Pipeline.from_pretrained(out, backend="onnxruntime")(generator=torch.Generator().manual_seed(1), progress=False, **kw)
    b = Pipeline.from_pretrained(onnx_fp32, backend="onnxruntime")(generator=torch.Generator().manual_seed(1), progress=False, **kw)
    assert np.abs(a.images - b.images).max() <= 1e-3  # the single file stores T5 in fp16, as t5xxl_fp16 does
