"""The official `openai` client (test extra) against the server on 127.0.0.1: its defaults, its
typed errors, the model list, sync and async; plus the raw-image answers (Accept header) and the
output formats."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
import torch
from harness import GENERATIONS
from PIL import Image

from sd35trt.runtime import Pipeline
from sd35trt.runtime.image import read_metadata
from sd35trt.server import BackgroundServer

openai = pytest.importorskip("openai", reason="pip install 'sd35trt[test]' brings the official openai client")
MODEL = "custom-medium"  # the tiny medium checkpoint's variant: the served model's id by default


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _expected(pipe: Pipeline, prompt: str, seed: int, steps: int) -> np.ndarray:
    """A direct pipeline call with `torch.Generator().manual_seed(seed)` (not via `Job.call_kwargs`)."""
    gen = torch.Generator().manual_seed(seed)
    return np.asarray(pipe(prompt, height=64, width=64, num_inference_steps=steps, generator=gen, progress=False).images[0])


def test_sync_client_defaults_errors_and_models(server: BackgroundServer, ort_pipe: Pipeline) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-local-test", max_retries=0, timeout=60)
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].owned_by == "sd35trt"
    assert client.models.retrieve(MODEL).id == MODEL

    r = client.images.generate(model=MODEL, prompt="a lighthouse at dusk", size="64x64")  # the client's defaults
    assert r.created > 0 and len(r.data) == 1 and r.output_format == "png" and r.size == "64x64"
    img = _image(r.data[0].b64_json)
    assert img.format == "PNG" and img.size == (64, 64)
    assert read_metadata(img)["sd35trt:steps"] == "40"  # the variant's default

    seeded = client.images.generate(model=MODEL, prompt="a lighthouse at dusk", size="64x64",
                                    extra_body={"seed": 5, "steps": 2})
    assert np.array_equal(np.asarray(_image(seeded.data[0].b64_json)), _expected(ort_pipe, "a lighthouse at dusk", 5, 2))

    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(model=MODEL, prompt="a fox", size="100x100")
    assert bad.value.status_code == 400 and bad.value.param == "size" and "multiple of 16" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(model="stable-cascade", prompt="a fox", size="64x64")
    assert bad.value.param == "model" and bad.value.code == "model_not_found" and MODEL in bad.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("stable-cascade")


def test_openai_fields_are_accepted_or_mapped(server: BackgroundServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-local-test", max_retries=0, timeout=60)
    r = client.images.generate(model="dall-e-3", prompt="a red fox", n=2, size="auto", output_format="jpeg",
                               output_compression=80, quality="high", style="vivid", user="u-1", moderation="low",
                               background="opaque", extra_body={"steps": 2, "seed": 3})
    assert r.output_format == "jpeg" and r.size == "128x128"  # auto: the model's default size
    images = [_image(d.b64_json) for d in r.data]
    assert [(i.format, i.size) for i in images] == [("JPEG", (128, 128))] * 2
    assert [read_metadata(i)["sd35trt:seed"] for i in images] == ["3", "4"]
    webp = client.images.generate(prompt="a red fox", size="64x64", output_format="webp", extra_body={"steps": 2})
    assert _image(webp.data[0].b64_json).format == "WEBP"


def test_async_client(server: BackgroundServer) -> None:
    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="sk-local-test", max_retries=0, timeout=60)
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        results = await asyncio.gather(*(client.images.generate(model=MODEL, prompt=f"a cat {i}", size="64x64",
                                                                extra_body={"steps": 2, "seed": i})
                                         for i in range(2)))
        assert all(_image(r.data[0].b64_json).size == (64, 64) for r in results)
        with pytest.raises(openai.BadRequestError) as bad:
            await client.images.generate(model=MODEL, prompt="a fox", size="64x64", response_format="url")
        assert bad.value.param == "response_format"
        await client.close()

    asyncio.run(run())


@pytest.mark.parametrize("accept,fmt", [("image/png", "PNG"), ("image/webp", "WEBP"), ("image/jpeg", "JPEG")])
def test_accept_header_gets_the_raw_image(client: httpx.Client, accept: str, fmt: str) -> None:
    r = client.post(GENERATIONS, json={"prompt": "a boat", "size": "64x64", "steps": 2, "seed": 1},
                    headers={"Accept": accept})
    assert r.status_code == 200 and r.headers["content-type"] == accept and r.headers["x-seed"] == "1"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == fmt and read_metadata(img)["sd35trt:seed"] == "1"
    default = client.post(GENERATIONS, json={"prompt": "a boat", "size": "64x64", "steps": 2})  # Accept: */*
    assert default.headers["content-type"] == "application/json" and "b64_json" in default.json()["data"][0]


def test_a_body_sent_as_text_is_told_to_use_json(client: httpx.Client) -> None:
    r = client.post(GENERATIONS, content=b'{"prompt": "a"}', headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]
