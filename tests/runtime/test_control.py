"""ControlNet arguments are checked before any heavy work; bad ones raise InvalidInputError
naming the argument and the fix (torch backend, tiny Large model + tiny ControlNets)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from sd35trt.export.tiny_controlnet import write_tiny_controlnet
from sd35trt.runtime import InvalidInputError, Pipeline
from sd35trt.runtime.control import keep

pytest.importorskip("diffusers", reason="diffusers (test extra) writes the tiny ControlNets")


@pytest.fixture(scope="module")
def cn(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_controlnet(tiny_models["large"], tmp_path_factory.mktemp("cn") / "a", "large", 2, seed=0)


@pytest.fixture(scope="module")
def multi(tiny_models: dict[str, Path], cn: Path):
    pipe = Pipeline.from_pretrained(tiny_models["large"], backend="torch", device="cpu", dtype=torch.float32,
                                    controlnet=[cn, cn])
    yield pipe
    pipe.close()


IMG = Image.new("RGB", (64, 64), (120, 30, 200))


def _call(pipe: Pipeline, **kw):
    kw = {"height": 64, "width": 64, "num_inference_steps": 2, "output_type": "latent", "progress": False, **kw}
    return pipe("a fox", **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(control_image=IMG), "a list of 2 entries"),
    (dict(control_image=[IMG]), "a list of 2 entries"),
    (dict(control_image=[IMG, IMG], controlnet_conditioning_scale=[1.0]), "controlnet_conditioning_scale"),
    (dict(control_image=[IMG, IMG], controlnet_conditioning_scale="1"), "finite number"),
    (dict(control_image=[IMG, IMG], control_guidance_start=0.6, control_guidance_end=0.5), "0 <= start < end"),
    (dict(control_image=[IMG, IMG], control_guidance_end=[1.0, 1.5]), "0 <= start < end"),
    (dict(control_image=[IMG, [IMG, IMG]]), "holds 2 images for 1 prompt"),
    (dict(control_image=[IMG, torch.zeros(1, 3, 32, 32)]), r"\[K, 3, 64, 64\]"),
    (dict(control_image=[IMG, IMG], control_generator=3), "control_generator=3"),
    (dict(control_image=[IMG, IMG], guidance_scale=5.0, skip_guidance_layers=[1]), "skip_guidance_layers"),
])
def test_bad_control_arguments(multi: Pipeline, kw: dict, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        _call(multi, **kw)


def test_one_image_per_prompt_and_no_control_image(multi: Pipeline) -> None:
    x = multi(["a fox", "a cat"], height=64, width=64, num_inference_steps=2, output_type="latent", progress=False,
              guidance_scale=1.0, control_image=[[IMG, IMG], IMG]).images
    assert x.shape == (2, 16, 8, 8)


def test_control_needs_a_controlnet_and_a_capable_backend(tiny_models: dict[str, Path], multi: Pipeline) -> None:
    pipe = Pipeline.from_pretrained(tiny_models["large"], backend="torch", device="cpu", dtype=torch.float32)
    try:
        with pytest.raises(InvalidInputError, match="no ControlNet is loaded"):
            _call(pipe, control_image=IMG)
        plain = _call(pipe, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).images
    finally:
        pipe.close()
    without = _call(multi, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(plain, without)  # without control_image the loaded ControlNets are not run
    with pytest.raises(InvalidInputError, match="must be a ControlNet folder"):
        Pipeline.from_pretrained(tiny_models["large"], backend="torch", device="cpu", controlnet=[])


def test_guidance_window_keep() -> None:
    # diffusers: keep = 1 - (i / n < start or (i + 1) / n > end)
    assert [keep(i, 4, 0.25, 0.75) for i in range(4)] == [0.0, 1.0, 1.0, 0.0]
    assert [keep(i, 4, 0.0, 1.0) for i in range(4)] == [1.0] * 4
