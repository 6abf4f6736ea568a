"""Pipeline.from_pretrained on a single-file checkpoint draws the folder's image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sd35trt.export.single_file import write_single_file
from sd35trt.runtime import Pipeline

KW = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", height=64, width=80,
          num_inference_steps=4, guidance_scale=3.0, output_type="np", progress=False)


def _image(pipe: Pipeline) -> np.ndarray:
    return pipe(**KW, generator=torch.Generator().manual_seed(0)).images


def _open(path: Path, **kw) -> Pipeline:
    return Pipeline.from_pretrained(path, backend="torch", device="cpu", dtype=torch.float32, **kw)


@pytest.fixture(scope="module")
def layouts(tiny_medium: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("single_pipe")
    return {t: write_single_file(tiny_medium, root / t, t5_dtype=t) for t in ("fp16", "fp8")}


def test_fp16_single_file_draws_the_folder_image(tiny_medium: Path, layouts) -> None:
    folder, single = _open(tiny_medium), _open(layouts["fp16"])
    assert single.config == folder.config
    plain = np.abs(_image(single) - _image(folder)).max()
    assert plain <= 1e-3  # only T5's weights differ: rounded to fp16 in the file (seen 6.3e-5)
    with torch.no_grad():  # the same rounding on the folder's T5 -> the very same weights
        for p in folder.backend.t5.model.parameters():
            p.copy_(p.half().float())
    assert np.abs(_image(single) - _image(folder)).max() <= 1e-6  # seen 0.0


def test_without_t5_single_file_equals_folder(tiny_medium: Path, layouts) -> None:
    single = _open(layouts["fp16"], load_t5=False)
    assert single.backend.t5 is None
    assert np.abs(_image(single) - _image(_open(tiny_medium, load_t5=False))).max() <= 1e-6  # seen 0.0


def test_fp8_t5_file_loads_and_runs(tiny_medium: Path, layouts) -> None:
    assert layouts["fp8"].parent.joinpath("t5xxl_fp8_e4m3fn.safetensors").is_file()
    single = _open(layouts["fp8"])
    assert single.backend.t5.model.shared.weight.dtype == torch.float32
    diff = np.abs(_image(single) - _image(_open(tiny_medium))).max()
    assert 0 < diff <= 0.05  # e4m3 T5 weights move the image a little (seen 5.8e-3)
