"""ControlNet requests on a real server (127.0.0.1): `control_image` (base64), `control_type`,
`control_scale`, `controlnet`; the image equals the Pipeline API's with that one ControlNet, and a
bad field is a 400 naming it."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from harness import GENERATIONS, SMALL
from PIL import Image

from sd35trt.export.tiny_controlnet import write_tiny_controlnet
from sd35trt.runtime import Pipeline
from sd35trt.server import BackgroundServer, Limits, ServeSettings, create_app

pytest.importorskip("diffusers", reason="diffusers (test extra) writes the tiny ControlNets")
pytest.importorskip("cv2", reason="opencv-python-headless (the control extra) makes the canny edges")
LIMITS = Limits(max_size=256, max_steps=50, max_prompt_chars=300, timeout_s=120)


def _png(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def setup(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("srv-cn")
    model = tiny_models["large"]
    a = write_tiny_controlnet(model, root / "a", "large", 3, seed=4)
    b = write_tiny_controlnet(model, root / "b", "large", 2, seed=5)
    pipe = Pipeline.from_pretrained(model, backend="torch", device="cpu", dtype=torch.float32, controlnet=[a, b])
    settings = ServeSettings(model=model, backend="torch", limits=LIMITS, controlnets=(("edges", str(a)), ("soft", str(b))))
    with BackgroundServer(create_app(settings, pipeline=pipe)) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        yield model, a, c
    pipe.close()


def _picture() -> np.ndarray:
    img = np.zeros((64, 64, 3), np.uint8)  # [H, W, 3]
    img[8:56, 12:22] = 240
    img[30:40, 20:60] = (30, 160, 250)
    return img


def test_control_request_equals_the_api_with_that_controlnet(setup) -> None:
    from sd35trt.runtime.pipeline import seed_generators
    from sd35trt.runtime.preprocess import control_input

    model, a, client = setup
    body = {"prompt": "a red fox", **SMALL, "seed": 3, "control_image": _png(_picture()), "control_type": "canny",
            "control_scale": 0.8, "controlnet": "edges"}
    resp = client.post(GENERATIONS, json=body)
    assert resp.status_code == 200, resp.text
    got = np.asarray(Image.open(io.BytesIO(resp.content))).astype(np.float32) / 255.0  # [64, 64, 3]
    with Pipeline.from_pretrained(model, backend="torch", device="cpu", dtype=torch.float32, controlnet=str(a)) as one:
        edges = control_input(Image.fromarray(_picture()), "canny", 64, 64)
        kw = dict(height=64, width=64, num_inference_steps=2, output_type="np", progress=False)
        want = one("a red fox", control_image=edges, controlnet_conditioning_scale=0.8,
                   control_generator=torch.Generator().manual_seed(3), generator=seed_generators(3, 1), **kw).images[0]
        plain = one("a red fox", generator=seed_generators(3, 1), **kw).images[0]
    assert float(np.abs(got - want).max()) <= 1.0 / 255 + 1e-6  # PNG rounding only
    assert float(np.abs(want - plain).max()) > 2.0 / 255


@pytest.mark.parametrize("extra,param", [
    ({"control_image": "!!not base64!!", "controlnet": "edges"}, "control_image"),
    ({"control_image": base64.b64encode(b"not an image").decode(), "controlnet": "edges"}, "control_image"),
    ({"control_image": "PIC", "controlnet": "edges", "control_type": "depth"}, "control_type"),
    ({"control_image": "PIC", "controlnet": "nope"}, "controlnet"),
    ({"control_image": "PIC"}, "controlnet"),  # two are served: name one
    ({"control_scale": 0.5}, "control_scale"),
    ({"control_image": "PIC", "controlnet": "edges", "control_scale": -1}, "control_scale"),
])
def test_bad_control_fields_are_400_naming_the_field(setup, extra: dict, param: str) -> None:
    client = setup[2]
    body = {"prompt": "a fox", **SMALL, **{k: (_png(_picture()) if v == "PIC" else v) for k, v in extra.items()}}
    resp = client.post(GENERATIONS, json=body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err


def test_server_without_controlnets_refuses_control_image(tiny_models: dict[str, Path]) -> None:
    pipe = Pipeline.from_pretrained(tiny_models["large"], backend="torch", device="cpu", dtype=torch.float32)
    settings = ServeSettings(model=tiny_models["large"], backend="torch", limits=LIMITS)
    try:
        with BackgroundServer(create_app(settings, pipeline=pipe)) as srv, httpx.Client(base_url=srv.url) as c:
            resp = c.post(GENERATIONS, json={"prompt": "a fox", **SMALL, "control_image": _png(_picture())})
    finally:
        pipe.close()
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "control_image"
    assert "--controlnet NAME=PATH" in resp.json()["error"]["message"]
