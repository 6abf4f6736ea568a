"""`sd35trt export --lora FILE[:SCALE]`: the LoRA fused before calibration, recorded in the
manifest ({file, sha256, scale}); a changed scale or file re-exports what it patches."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sd35trt.cli import main
from sd35trt.runtime import Pipeline
from sd35trt.runtime.files import sha256_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from lora_writers import write_kohya_lora  # noqa: E402

pytest.importorskip("onnxruntime", reason="onnxruntime (test extra) runs the exported graphs")
CALL = dict(prompt="a lighthouse", negative_prompt="fog", height=64, width=64, num_inference_steps=3,
            guidance_scale=4.0, output_type="np", progress=False)


def test_export_fuses_the_lora_records_it_and_detects_a_change(tiny_models: dict[str, Path], tmp_path: Path,
                                                               capsys) -> None:
    model, lora, out = tiny_models["large"], tmp_path / "style.safetensors", tmp_path / "onnx"
    write_kohya_lora(model, lora, seed=1)
    argv = ["export", "--model", str(model), "--out", str(out), "--precision", "fp32", "--no-t5", "--quiet",
            "--lora", f"{lora}:0.7"]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["loras"] == [{"file": str(lora), "sha256": sha256_file(lora), "scale": 0.7}]
    ref = Pipeline.from_pretrained(model, device="cpu", dtype=torch.float32, load_t5=False)
    ref.load_lora(lora, fuse=True, scale=0.7)
    want = ref(generator=torch.Generator().manual_seed(2), **CALL).images
    got = Pipeline.from_pretrained(out, backend="onnxruntime")(generator=torch.Generator().manual_seed(2), **CALL).images
    plain = Pipeline.from_pretrained(model, device="cpu", dtype=torch.float32, load_t5=False)(
        generator=torch.Generator().manual_seed(2), **CALL).images
    assert np.abs(got - want).max() <= 1e-4 and np.abs(got - plain).max() > 0.02
    capsys.readouterr()
    assert main(argv) == 0 and "0 exported" in capsys.readouterr().out  # same LoRA, same scale: nothing to do
    assert main([*argv[:-1], f"{lora}:0.5"]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[-2] for line in table.splitlines() if line.split() and
            line.split()[0] in ("clip_l", "clip_g", "transformer", "vae_decoder")}
    assert rows == {"clip_l": "exported", "clip_g": "exported", "transformer": "exported", "vae_decoder": "cached"}
    assert json.loads((out / "manifest.json").read_text())["loras"][0]["scale"] == 0.5
