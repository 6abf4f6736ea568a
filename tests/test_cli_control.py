"""`generate --controlnet PATH --control-image IMG [--control-type canny|blur] [--control-scale S]`:
the image equals the Pipeline API's with the same preprocessing; bad flags exit 2 before torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd35trt.cli import main
from sd35trt.export.tiny_controlnet import write_tiny_controlnet

pytest.importorskip("diffusers", reason="diffusers (test extra) writes the tiny ControlNet")
pytest.importorskip("cv2", reason="opencv-python-headless (the control extra) makes the canny edges")


@pytest.fixture(scope="module")
def cn(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_controlnet(tiny_models["large"], tmp_path_factory.mktemp("cli-cn") / "cn", "large", 3, seed=2)


@pytest.fixture(scope="module")
def control_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    a = np.zeros((64, 64, 3), np.uint8)  # [H, W, 3]: a bright bar and a disc
    a[10:54, 20:30] = 230
    yy, xx = np.mgrid[0:64, 0:64]
    a[(yy - 40) ** 2 + (xx - 44) ** 2 < 120] = (40, 180, 250)
    path = tmp_path_factory.mktemp("ctl") / "control.png"
    Image.fromarray(a).save(path)
    return path


def test_generate_with_canny_controlnet_equals_the_api(tiny_models: dict[str, Path], cn: Path, control_png: Path,
                                                       tmp_path: Path) -> None:
    from sd35trt.runtime import Pipeline
    from sd35trt.runtime.preprocess import control_input

    out = tmp_path / "cn.png"
    rc = main(["generate", "--model", str(tiny_models["large"]), "--prompt", "a fox", "--steps", "3", "--seed", "5",
               "--height", "64", "--width", "64", "--device", "cpu", "--quiet", "--controlnet", str(cn),
               "--control-image", str(control_png), "--control-type", "canny", "--control-scale", "0.8",
               "--out", str(out)])
    assert rc == 0
    got = np.asarray(Image.open(out)).astype(np.float32) / 255.0  # [64, 64, 3]
    with Pipeline.from_pretrained(tiny_models["large"], backend="torch", device="cpu", controlnet=str(cn)) as pipe:
        edges = control_input(Image.open(control_png), "canny", 64, 64)
        kw = dict(num_inference_steps=3, height=64, width=64, generator=torch.Generator().manual_seed(5),
                  output_type="np", progress=False)
        want = pipe("a fox", control_image=edges, controlnet_conditioning_scale=0.8,
                    control_generator=torch.Generator().manual_seed(5), **kw).images[0]
        kw["generator"] = torch.Generator().manual_seed(5)
        plain = pipe("a fox", **kw).images[0]
    assert float(np.abs(got - want).max()) <= 1.0 / 255 + 1e-6  # PNG rounding only
    assert float(np.abs(want - plain).max()) > 2.0 / 255  # the ControlNet changed the image


@pytest.mark.parametrize("flags,message", [
    (["--control-image", "IMG"], "--control-image needs --controlnet"),
    (["--controlnet", "CN"], "--controlnet needs --control-image"),
    (["--controlnet", "CN", "--control-image", "IMG", "--control-scale", "1", "--control-scale", "2"],
     "--control-scale is given 2 times for 1 --controlnet"),
    (["--controlnet", "NOCFG", "--control-image", "IMG"], "no config.json there"),
    (["--controlnet", "CN", "--control-image", "NOPE"], "not a readable image"),
])
def test_bad_control_flags_exit_2(flags: list[str], message: str, tiny_models: dict[str, Path], cn: Path,
                                  control_png: Path, tmp_path: Path, capsys) -> None:
    subs = {"IMG": str(control_png), "CN": str(cn), "NOCFG": str(tmp_path), "NOPE": str(tmp_path / "none.png")}
    argv = ["generate", "--model", str(tiny_models["large"]), "--prompt", "x", "--device", "cpu",
            "--out", str(tmp_path / "x.png"), *[subs.get(f, f) for f in flags]]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
