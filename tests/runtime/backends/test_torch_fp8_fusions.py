"""`torch-fp8` opt-in fusions (backends/fp8_fusions.py) through the pipeline: none by default, the
adaLN bank gives the default's latents, bad names are refused before any loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sd35trt.runtime import Pipeline
from sd35trt.runtime.errors import InvalidInputError
from sd35trt.runtime.models.fp8 import HIGH_PRECISION, max_calibrate

KW = dict(prompt="an orange cat on a windowsill", negative_prompt="blurry", height=64, width=64,
          num_inference_steps=2, guidance_scale=4.5, output_type="latent")


def _latent(pipe: Pipeline) -> torch.Tensor:
    return pipe(**KW, generator=torch.Generator().manual_seed(4), progress=False).images.flatten().double()


@torch.no_grad()
def test_adaln_bank_through_the_backend_gives_the_default_latents(tiny_medium: Path) -> None:
    bf16 = Pipeline.from_pretrained(tiny_medium, device="cpu")
    amax = max_calibrate(bf16.backend.modules["transformer"], lambda m: _latent(bf16), HIGH_PRECISION)
    plain = Pipeline.from_pretrained(tiny_medium, backend="torch-fp8", device="cpu", calibration=amax)
    banked = Pipeline.from_pretrained(tiny_medium, backend="torch-fp8", device="cpu", calibration=amax,
                                      fusions=("adaln-bank",))
    assert not hasattr(plain.backend.modules["transformer"], "adaln_bank")
    assert hasattr(banked.backend.modules["transformer"], "adaln_bank")
    a, b = _latent(plain), _latent(banked)
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    assert cos > 0.99999, cos  # seen bit-equal on the CPU
    with pytest.raises(InvalidInputError, match="fusions"):
        Pipeline.from_pretrained(tiny_medium, backend="torch-fp8", device="cpu", calibration=amax, fusions=("nope",))
