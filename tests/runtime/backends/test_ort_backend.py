"""ONNX Runtime backend end to end on the tiny medium checkpoint, same loop as torch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sd35trt.runtime import BackendError, CheckpointError, Pipeline

pytest.importorskip("onnxruntime", reason="onnxruntime (test extra) runs the exported graphs")
KW = dict(prompt='a poster that says "SD35"', negative_prompt="blurry", height=64, width=96,
          num_inference_steps=6, guidance_scale=4.5)


def _run(pipe: Pipeline, output_type: str = "np", seed: int = 21):
    return pipe(**KW, generator=torch.Generator().manual_seed(seed), output_type=output_type, progress=False).images


def test_fp32_graphs_reproduce_the_torch_image(onnx_fp32: Path, tiny_medium: Path) -> None:
    ours = _run(Pipeline.from_pretrained(onnx_fp32, backend="onnxruntime"))
    ref = _run(Pipeline.from_pretrained(tiny_medium, backend="torch", device="cpu", dtype=torch.float32))
    assert ours.shape == ref.shape == (1, 64, 96, 3)
    assert np.abs(ours - ref).max() <= 1e-3


def test_each_sampler_on_the_graphs_reproduces_the_torch_image(onnx_fp32: Path, tiny_medium: Path) -> None:
    kw = dict(KW, height=64, width=64, num_inference_steps=4, output_type="np", progress=False)
    with (Pipeline.from_pretrained(onnx_fp32, backend="onnxruntime") as ort,
          Pipeline.from_pretrained(tiny_medium, backend="torch", device="cpu", dtype=torch.float32) as ref):
        for sampler in ("dpmpp_2m", "dpmpp_2m_sde", "heun"):
            a, b = (p(**kw, generator=torch.Generator().manual_seed(5), sampler=sampler).images for p in (ort, ref))
            assert np.abs(a - b).max() <= 1e-3, sampler


def test_fp8_pipeline_close_to_fp32_pipeline(onnx_fp8: Path, onnx_fp32: Path, capsys) -> None:
    a = _run(Pipeline.from_pretrained(onnx_fp8, backend="onnxruntime"), "latent").flatten().double()
    b = _run(Pipeline.from_pretrained(onnx_fp32, backend="onnxruntime"), "latent").flatten().double()
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    with capsys.disabled():
        print(f"\n[fp8 vs fp32 final-latent cosine: {cos:.5f}]")
    assert cos >= 0.99
    assert not torch.equal(a, b)  # FP8 is really in the graph


def test_variant_and_defaults_come_from_the_manifest(onnx_fp32: Path) -> None:
    pipe = Pipeline.from_pretrained(onnx_fp32, backend="onnxruntime")
    assert pipe.config.family == "medium" and pipe.config.sampling.steps == 40
    assert pipe.backend.t5 is not None


def test_tampered_graph_is_refused(onnx_fp32: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(onnx_fp32, bad)
    (bad / "transformer.onnx").write_bytes(b"not onnx")
    with pytest.raises(CheckpointError, match="transformer.onnx"):
        Pipeline.from_pretrained(bad, backend="onnxruntime")
    manifest = json.loads((onnx_fp32 / "manifest.json").read_text())
    manifest["format"] = "something-else/9"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="re-export"):
        Pipeline.from_pretrained(bad, backend="onnxruntime")


def test_a_failing_run_is_a_backend_error_naming_the_graph(onnx_fp32: Path) -> None:
    pipe = Pipeline.from_pretrained(onnx_fp32, backend="onnxruntime")
    wrong = torch.zeros(1, 3, 8, 8)  # 3 latent channels where the graph needs 16: ONNX Runtime refuses it
    with pytest.raises(BackendError, match=r"vae_decoder.onnx: ONNX Runtime failed on inputs latent\[1, 3, 8, 8\]"):
        pipe.backend.vae_decoder(wrong)
    image = pipe.backend.vae_decoder(torch.zeros(1, 16, 8, 8))  # the session still works
    assert image.shape == (1, 3, 64, 64)
