"""`torch-fp8` backend: real FP8 GEMMs (torch._scaled_mm) from the export's ModelOpt calibration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sd35trt.runtime import CheckpointError, Pipeline
from sd35trt.runtime.models.fp8 import FP8Linear

KW = dict(prompt="an orange cat on a windowsill", negative_prompt="blurry", height=64, width=64,
          num_inference_steps=6, guidance_scale=4.5, output_type="latent")


def _latent(pipe: Pipeline) -> torch.Tensor:
    return pipe(**KW, generator=torch.Generator().manual_seed(4), progress=False).images.flatten().double()


def test_fp8_backend_close_to_fp32_and_to_the_fp8_graph(tiny_medium: Path, onnx_fp8: Path, capsys) -> None:
    fp8 = Pipeline.from_pretrained(tiny_medium, backend="torch-fp8", device="cpu", calibration=onnx_fp8 / "calibration")
    linears = [m for m in fp8.backend.transformer.model.modules() if isinstance(m, torch.nn.Linear)]
    assert fp8.backend.fp8_layers > 0 and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert all(m.weight_t.dtype == torch.float8_e4m3fn for m in fp8.backend.transformer.model.modules()
               if isinstance(m, FP8Linear))
    ours = _latent(fp8)
    ref = _latent(Pipeline.from_pretrained(tiny_medium, device="cpu", dtype=torch.float32))
    graph = _latent(Pipeline.from_pretrained(onnx_fp8, backend="onnxruntime"))
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731
    with capsys.disabled():
        print(f"\n[torch-fp8 final latent cosine: vs fp32 {cos(ours, ref):.5f}, vs FP8 ONNX {cos(ours, graph):.5f}]")
    assert 1 - cos(ours, ref) <= 2e-3  # seen 0.99991 (1 - cos = 9e-5)
    assert 1 - cos(ours, graph) <= 1e-3  # seen 0.99993 (7e-5)
    assert not torch.equal(ours, ref)


def test_calibration_is_required_and_must_match(tiny_models: dict[str, Path], onnx_fp8: Path) -> None:
    with pytest.raises(CheckpointError, match="calibration="):
        Pipeline.from_pretrained(tiny_models["medium"], backend="torch-fp8", device="cpu")
    # the large tiny model has no attn2 layers: the medium calibration names layers it lacks
    with pytest.raises(CheckpointError, match="does not match"):
        Pipeline.from_pretrained(tiny_models["large"], backend="torch-fp8", device="cpu",
                                 calibration=onnx_fp8 / "calibration")


@pytest.mark.parametrize("bad", ["max-autotune", 1, None])
def test_bad_compile_value_is_refused_before_loading(tiny_medium: Path, bad) -> None:
    from sd35trt.runtime import InvalidInputError

    with pytest.raises(InvalidInputError, match="compile="):
        Pipeline.from_pretrained(tiny_medium, backend="torch-fp8", device="cpu", calibration="/nonexistent",
                                 compile=bad)


def test_fp8_backend_runs_the_image_modes_in_bf16_on_the_cpu(tiny_medium: Path, onnx_fp8: Path) -> None:
    """The bf16 VAE encoder (eager on the CPU) and SLG: final latents close to the fp32 torch backend."""
    import numpy as np

    fp8 = Pipeline.from_pretrained(tiny_medium, backend="torch-fp8", device="cpu", calibration=onnx_fp8 / "calibration")
    ref = Pipeline.from_pretrained(tiny_medium, device="cpu", dtype=torch.float32)
    encoder = fp8.backend.modules["vae_encoder"]
    assert next(encoder.parameters()).dtype == torch.bfloat16 and not hasattr(encoder, "_orig_mod")
    g = np.random.default_rng(0)
    pic = g.uniform(0.2, 0.8, (64, 64, 3)).astype(np.float32)  # [H, W, 3]
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 8:40] = 1.0
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731
    for extra in (dict(image=pic, mask_image=mask, strength=0.8),  # the encoder, the blend
                  dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)):
        kw = {**KW, **extra, "num_inference_steps": 3, "max_sequence_length": 16}  # kept short: FP8 on a CPU is slow
        a = fp8(**kw, generator=torch.Generator().manual_seed(4), progress=False).images.flatten().double()
        b = ref(**kw, generator=torch.Generator().manual_seed(4), progress=False).images.flatten().double()
        assert cos(a, b) >= 0.99, (sorted(extra), cos(a, b))
