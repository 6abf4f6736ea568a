"""Skip-layer guidance on POST /v1/images/generations: the fields reach the pipeline (torch
backend, tiny medium: the image equals a direct `pipe(..., skip_guidance_layers=...)` call for the
seed; metadata and /metrics say SLG ran), and bad values get 400 naming the field."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from harness import GENERATIONS, SMALL, metric
from PIL import Image

from sd35trt.runtime import Pipeline
from sd35trt.server import BackgroundServer, Limits, ServeSettings, create_app

SLG = {"skip_guidance_layers": [1, 2], "guidance": 4.0}
# (case, body, field named, code, fragment); all answer 400 (tiny medium: 4 transformer blocks)
BAD = [
    ("layer out of range", {**SLG, "skip_guidance_layers": [1, 4]}, "skip_guidance_layers", "invalid_value",
     "[4] outside [0, 3]"),
    ("layers empty", {**SLG, "skip_guidance_layers": []}, "skip_guidance_layers", "invalid_value", "is empty"),
    ("layers not a list", {**SLG, "skip_guidance_layers": "7,8,9"}, "skip_guidance_layers", "invalid_type",
     "valid list"),
    ("layer not an int", {**SLG, "skip_guidance_layers": [1.5]}, "skip_guidance_layers.0", "invalid_type",
     "valid integer"),
    ("no CFG", {**SLG, "guidance": 1.0}, "skip_guidance_layers", "invalid_value", "needs classifier-free guidance"),
    ("scale without layers", {"skip_layer_guidance_scale": 3.0}, "skip_layer_guidance_scale", "invalid_value",
     "applies only with skip_guidance_layers"),
    ("scale negative", {**SLG, "skip_layer_guidance_scale": -1.0}, "skip_layer_guidance_scale", "invalid_value",
     "greater than or equal to 0"),
    ("start after stop", {**SLG, "skip_layer_guidance_start": 0.5, "skip_layer_guidance_stop": 0.2},
     "skip_layer_guidance_start", "invalid_value", "not below skip_layer_guidance_stop"),
    ("stop above 1", {**SLG, "skip_layer_guidance_stop": 1.5}, "skip_layer_guidance_stop", "invalid_value",
     "less than or equal to 1"),
]


@pytest.mark.parametrize("case,body,field,code,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_skip_layer_fields_get_400_naming_the_field(client: httpx.Client, case, body, field, code,
                                                        fragment) -> None:
    r = client.post(GENERATIONS, json={"prompt": "a fox", **SMALL, **body})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == field and err["code"] == code, err
    assert fragment in err["message"] and err["message"].startswith(f"{field}:"), err["message"]


def test_a_backend_that_cannot_skip_blocks_refuses_naming_the_field(client: httpx.Client, ort_pipe: Pipeline) -> None:
    r = client.post(GENERATIONS, json={"prompt": "a fox", "seed": 1, **SMALL, **SLG})
    if ort_pipe.backend.skip_layers:  # the exported graph takes a skip input: it runs
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).text["sd35trt:slg"].startswith("1,2 ")
    else:
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "skip_guidance_layers", err
        assert "onnxruntime" in err["message"] and "backend='torch'" in err["message"]


@pytest.fixture(scope="module")
def torch_pipe(tiny_medium: Path):
    pipe = Pipeline.from_pretrained(tiny_medium, backend="torch", device="cpu", dtype=torch.float32)
    yield pipe
    pipe.close()


def test_skip_layer_guidance_reaches_the_pipeline(tiny_medium: Path, torch_pipe: Pipeline) -> None:
    settings = ServeSettings(model=tiny_medium, backend="torch", limits=Limits(max_size=256, timeout_s=60))
    window = {"skip_layer_guidance_scale": 3.5, "skip_layer_guidance_start": 0.1, "skip_layer_guidance_stop": 0.6}
    with BackgroundServer(create_app(settings, pipeline=torch_pipe)) as srv, httpx.Client(base_url=srv.url,
                                                                                          timeout=60) as c:
        r = c.post(GENERATIONS, json={"prompt": "a lighthouse", "seed": 4, **SMALL, "steps": 6, **SLG, **window})
        plain = c.post(GENERATIONS, json={"prompt": "a lighthouse", "seed": 4, **SMALL, "steps": 6, "guidance": 4.0})
        assert r.status_code == 200 and plain.status_code == 200, r.text
        assert metric(c, "sd35trt_mode_images_total", mode="text-to-image", slg="on") == 1
        assert metric(c, "sd35trt_mode_images_total", mode="text-to-image", slg="off") == 1
    want = torch_pipe("a lighthouse", height=64, width=64, num_inference_steps=6, guidance_scale=4.0,
                      skip_guidance_layers=[1, 2], skip_layer_guidance_scale=3.5, skip_layer_guidance_start=0.1,
                      skip_layer_guidance_stop=0.6, generator=torch.Generator().manual_seed(4), progress=False)
    got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    assert np.array_equal(got, np.asarray(want.images[0]))
    assert not np.array_equal(got, np.asarray(Image.open(io.BytesIO(plain.content)).convert("RGB")))  # SLG acted
    meta = Image.open(io.BytesIO(r.content)).text
    assert (meta["sd35trt:mode"], meta["sd35trt:slg"]) == ("text-to-image", "1,2 scale=3.5 start=0.1 stop=0.6")
    assert Image.open(io.BytesIO(plain.content)).text["sd35trt:slg"] == "off"
