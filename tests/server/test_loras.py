"""LoRAs in the server: `--lora-dir` loads them at start, GET /v1/loras lists them, a request's
`loras` picks them by name; an unknown name, a path, a scale out of range: 400 with param 'loras'."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from harness import GENERATIONS, SMALL
from PIL import Image

from sd35trt.runtime import Pipeline
from sd35trt.runtime.batching import Job
from sd35trt.server import BackgroundServer, Limits, ServeSettings, create_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from lora_writers import write_kohya_lora  # noqa: E402


@pytest.fixture(scope="module")
def lora_server(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    path, folder = tiny_models["large"], tmp_path_factory.mktemp("lora-dir")
    write_kohya_lora(path, folder / "style.safetensors", seed=1)
    write_kohya_lora(path, folder / "detail.safetensors", seed=2)
    pipe = Pipeline.from_pretrained(path, backend="torch", device="cpu", dtype=torch.float32)
    settings = ServeSettings(model=path, backend="torch", lora_dir=folder,
                             limits=Limits(max_size=256, max_steps=50, timeout_s=120))
    with BackgroundServer(create_app(settings, pipeline=pipe)) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        yield c, pipe


def test_lora_dir_is_loaded_and_listed(lora_server) -> None:
    client, pipe = lora_server
    body = client.get("/v1/loras").json()
    assert [d["id"] for d in body["data"]] == ["detail", "style"] == pipe.loras
    assert body["data"][0]["rank"] == 2 and body["data"][0]["fused"] is False and len(body["data"][0]["sha256"]) == 64


def test_request_loras_give_the_pipeline_image(lora_server) -> None:
    client, pipe = lora_server
    r = client.post(GENERATIONS, json={"prompt": "a lighthouse", "seed": 5, **SMALL,
                                       "loras": [{"name": "style", "scale": 0.8}, {"name": "detail", "scale": -0.5}]})
    assert r.status_code == 200, r.text
    job = Job("a lighthouse", seed=5, height=64, width=64, steps=2, loras=(("style", 0.8), ("detail", -0.5)))
    want = np.asarray(pipe(**job.call_kwargs(), progress=False).images[0])
    plain = np.asarray(pipe(**Job("a lighthouse", seed=5, height=64, width=64, steps=2).call_kwargs(),
                            progress=False).images[0])
    got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    assert np.array_equal(got, want) and not np.array_equal(got, plain)


@pytest.mark.parametrize("loras, says", [
    ([{"name": "nope", "scale": 1.0}], "'nope' is not loaded"),
    ([{"name": "/etc/style.safetensors"}], "looks like a path"),
    ([{"name": "../style"}], "looks like a path"),
    ([{"name": "style", "scale": 2.5}], "outside [-2.0, 2.0]"),
    ([{"name": "style"}, {"name": "style"}], "appears twice"),
    ([{"name": "style"}] * 5, "exceed the limit of 4"),
])
def test_bad_loras_are_400_naming_the_field(lora_server, loras, says: str) -> None:
    client, _ = lora_server
    r = client.post(GENERATIONS, json={"prompt": "a fox", **SMALL, "loras": loras})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "loras" and says in err["message"], err


def test_a_mistyped_lora_entry_names_the_field(lora_server) -> None:
    client, _ = lora_server
    r = client.post(GENERATIONS, json={"prompt": "a fox", **SMALL, "loras": [{"name": "style", "path": "/x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("loras")
