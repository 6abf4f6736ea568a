"""The HTTP contract on a real server (127.0.0.1, ONNX Runtime backend, tiny checkpoint): images,
the bad-input table, metrics, batching, queue limit, client disconnects, timeouts, startup faults."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import torch
from harness import GENERATIONS, SMALL, metric, settings, wait_until
from PIL import Image

from sd35trt.runtime import Pipeline
from sd35trt.runtime.errors import (BackendError, ClosedError, InvalidInputError, NonFiniteLatentsError,
                                    OutOfMemoryError, QueueFullError)
from sd35trt.server import BackgroundServer, Limits, ServeSettings, create_app
from sd35trt.server.app import error_response
from sd35trt.server.schema import FieldError


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _expected(pipe: Pipeline, prompt: str, seed: int, n: int = 1, negative: str | None = None,
              sampler: str = "euler") -> list[np.ndarray]:
    """What a direct pipeline call gives for the request alone (SMALL: 64x64, 2 steps), image i drawn
    from `torch.Generator().manual_seed(seed + i)`, as 8-bit images; not via `Job.call_kwargs`."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    images = pipe(prompt, negative_prompt=negative, height=64, width=64, num_inference_steps=2, num_images_per_prompt=n,
                  generator=generators, output_type="pil", sampler=sampler, progress=False).images
    return [np.asarray(img) for img in images]


def test_health_and_readiness(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready" and ready.json()["backend"] == "onnxruntime"
    assert metric(client, "sd35trt_ready") == 1.0


def test_png_is_the_pipeline_image_for_the_seed(client: httpx.Client, ort_pipe: Pipeline) -> None:
    r = client.post(GENERATIONS, json={"prompt": "a lighthouse", "negative_prompt": "blurry", "seed": 5, **SMALL})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.headers["x-seed"] == "5"
    assert np.array_equal(_png(r.content), _expected(ort_pipe, "a lighthouse", 5, negative="blurry")[0])
    text = Image.open(io.BytesIO(r.content)).text
    assert text["sd35trt:seed"] == "5" and text["sd35trt:prompt"] == "a lighthouse" and text["sd35trt:size"] == "64x64"


def test_b64_json_returns_n_images_with_consecutive_seeds(client: httpx.Client, ort_pipe: Pipeline) -> None:
    r = client.post(GENERATIONS, json={**SMALL, "prompt": "a fox", "seed": 9, "n": 3, "response_format": "b64_json"})
    assert r.status_code == 200
    data = r.json()["data"]
    assert [d["seed"] for d in data] == [9, 10, 11]
    for got, want in zip(data, _expected(ort_pipe, "a fox", 9, n=3)):
        assert np.array_equal(_png(base64.b64decode(got["b64_json"])), want)


def test_the_sampler_field_reaches_the_pipeline(client: httpx.Client, ort_pipe: Pipeline) -> None:
    r = client.post(GENERATIONS, json={"prompt": "a fox", "seed": 3, "sampler": "dpmpp_2m_sde", **SMALL})
    assert r.status_code == 200
    want = _expected(ort_pipe, "a fox", 3, sampler="dpmpp_2m_sde")[0]
    assert np.array_equal(_png(r.content), want)
    assert not np.array_equal(want, _expected(ort_pipe, "a fox", 3)[0])  # the sampler changed the image
    r = client.post(GENERATIONS, json={**SMALL, "prompt": "a fox", "seed": 3, "n": 2, "sampler": "dpmpp_2m_sde",
                                       "response_format": "b64_json"})  # one batch of two SDE images
    assert r.status_code == 200
    for d in r.json()["data"]:  # each equals its twin run alone with its own seed
        assert np.array_equal(_png(base64.b64decode(d["b64_json"])), _expected(ort_pipe, "a fox", d["seed"],
                                                                                 sampler="dpmpp_2m_sde")[0])


# (case, body: dict or raw bytes, field named, OpenAI error code, fragment of the message); all answer 400
BAD = [
    ("bad JSON", b'{"prompt": "a",', None, "invalid_json", "not valid JSON"),
    ("JSON but not an object", b'["a fox"]', None, "invalid_type", "JSON object"),
    ("empty body", b"", None, "missing_required_parameter", "prompt"),
    ("prompt missing", {"size": "64x64"}, "prompt", "missing_required_parameter", "Field required"),
    ("prompt not a string", {"prompt": 3}, "prompt", "invalid_type", "valid string"),
    ("steps as a string", {"prompt": "a", "steps": "4"}, "steps", "invalid_type", "valid integer"),
    ("steps as a float", {"prompt": "a", "steps": 4.0}, "steps", "invalid_type", "valid integer"),
    ("n as a bool", {"prompt": "a", "n": True}, "n", "invalid_type", "valid integer"),
    ("guidance as a string", {"prompt": "a", "guidance": "high"}, "guidance", "invalid_type", "valid number"),
    ("guidance negative", {"prompt": "a", "guidance": -1.0}, "guidance", "invalid_value", "greater than or equal to 0"),
    ("guidance NaN", b'{"prompt": "a", "guidance": NaN}', "guidance", "invalid_value", "finite"),
    ("seed negative", {"prompt": "a", "seed": -1}, "seed", "invalid_value", "greater than or equal to 0"),
    ("size not WxH", {"prompt": "a", "size": "large"}, "size", "invalid_value", "WIDTHxHEIGHT"),
    ("size not a multiple of 16", {"prompt": "a", "size": "72x64"}, "size", "invalid_value", "not a multiple of 16; use 64 or 80"),
    ("size too large", {"prompt": "a", "size": "1024x1024"}, "size", "invalid_value", "outside [16, 256]"),
    ("size zero", {"prompt": "a", "size": "0x64"}, "size", "invalid_value", "outside [16, 256]"),
    ("steps 0", {"prompt": "a", "steps": 0}, "steps", "invalid_value", "outside [1, 500]"),
    ("unknown sampler", {"prompt": "a", "sampler": "ddim"}, "sampler", "unsupported_value", "'ddim' is not one of"),
    ("steps 10**6", {"prompt": "a", "steps": 10**6}, "steps", "invalid_value", "outside [1, 500]"),
    ("n too large", {"prompt": "a", "n": 5, "response_format": "b64_json"}, "n", "invalid_value", "outside [1, 4]"),
    ("n zero", {"prompt": "a", "n": 0}, "n", "invalid_value", "outside [1, 4]"),
    ("n > 1 as png", {"prompt": "a", "n": 2}, "n", "invalid_value", "b64_json"),
    ("prompt too long", {"prompt": "a" * 301}, "prompt", "invalid_value", "301 characters exceed the limit of 300"),
    ("negative prompt too long", {"prompt": "a", "negative_prompt": "b" * 400}, "negative_prompt", "invalid_value", "400 characters"),
    ("prompt blank", {"prompt": "   "}, "prompt", "invalid_value", "empty"),
    ("unknown field", {"prompt": "a", "unicorns": 3}, "unicorns", "unknown_parameter", "unknown field"),
    ("response_format unknown", {"prompt": "a", "response_format": "jpeg"}, "response_format", "invalid_value", "'b64_json', 'url' or 'png'"),
    ("response_format url", {"prompt": "a", "response_format": "url"}, "response_format", "unsupported_value", "stores no images"),
    ("output_format gif", {"prompt": "a", "output_format": "gif", "response_format": "b64_json"}, "output_format", "unsupported_value", "'png', 'jpeg', 'webp'"),
    ("output_format vs png", {"prompt": "a", "output_format": "jpeg"}, "output_format", "invalid_value", "conflicts with response_format 'png'"),
    ("output_compression 101", {"prompt": "a", "output_compression": 101}, "output_compression", "invalid_value", "less than or equal to 100"),
    ("transparent background", {"prompt": "a", "background": "transparent"}, "background", "unsupported_value", "opaque"),
    ("stream", {"prompt": "a", "stream": True}, "stream", "unsupported_value", "streaming is not supported"),
    ("partial images", {"prompt": "a", "partial_images": 2}, "partial_images", "unsupported_value", "streaming"),
    ("gif frames", {"prompt": "a", "frame_count": 4}, "frame_count", "unsupported_value", "GIF/SVG"),
    ("unknown model", {"prompt": "a", "model": "stable-cascade"}, "model", "model_not_found", "is not served here"),
]


@pytest.mark.parametrize("case,body,field,code,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_400_naming_the_field(client: httpx.Client, case, body, field, code, fragment) -> None:
    if isinstance(body, bytes):
        r = client.post(GENERATIONS, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(GENERATIONS, json={**SMALL, **body} if "size" not in body else body)
    err = r.json()["error"]
    assert r.status_code == 400, err
    assert err["param"] == field and err["code"] == code and err["type"] == "invalid_request_error", err
    assert fragment in err["message"], err["message"]
    if field is not None:
        assert err["message"].startswith(f"{field}:")
    ok = client.post(GENERATIONS, json={"prompt": "still serving", **SMALL})  # the server keeps serving
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"


def test_metrics_count_requests_latency_and_batches(client: httpx.Client) -> None:
    before = {k: metric(client, *k) if isinstance(k, tuple) else metric(client, k) for k in (
        "sd35trt_request_latency_seconds_count", "sd35trt_batch_size_sum")}
    ok_before, bad_before = (metric(client, "sd35trt_requests_total", status=s) for s in ("200", "400"))
    for i in range(2):
        assert client.post(GENERATIONS, json={"prompt": f"m{i}", **SMALL}).status_code == 200
    assert client.post(GENERATIONS, json={"prompt": "m", "steps": 0}).status_code == 400
    assert metric(client, "sd35trt_requests_total", status="200") == ok_before + 2
    assert metric(client, "sd35trt_requests_total", status="400") == bad_before + 1
    assert metric(client, "sd35trt_request_latency_seconds_count") == before["sd35trt_request_latency_seconds_count"] + 3
    assert metric(client, "sd35trt_batch_size_sum") == before["sd35trt_batch_size_sum"] + 2
    assert metric(client, "sd35trt_queue_depth") == 0
    assert "sd35trt_gpu_memory_bytes" not in client.get("/metrics").text  # no CUDA here: no GPU gauge


def _post_many(url: str, bodies: list[dict]) -> list[httpx.Response]:
    out: list = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def post(i: int) -> None:
        barrier.wait()
        out[i] = httpx.post(url + GENERATIONS, json=bodies[i], timeout=60)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    return out


def test_four_concurrent_requests_run_as_one_batch(onnx_fp32: Path, ort_pipe: Pipeline) -> None:
    app = create_app(settings(onnx_fp32, max_batch=4, batch_window_ms=2000), pipeline=ort_pipe)
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url) as c:
        bodies = [{"prompt": p, "seed": 100 + i, **SMALL} for i, p in enumerate(["a", "b fox", "c cat", "d"])]
        responses = _post_many(srv.url, bodies)
        assert [r.status_code for r in responses] == [200] * 4
        assert all(r.headers["x-batch-images"] == "4" for r in responses)
        assert metric(c, "sd35trt_batches_total") == 1
        assert metric(c, "sd35trt_batch_size_bucket", le="4.0") - metric(c, "sd35trt_batch_size_bucket", le="3.0") == 1
    for body, r in zip(bodies, responses):  # each equals its unbatched twin
        assert np.array_equal(_png(r.content), _expected(ort_pipe, body["prompt"], body["seed"])[0])


def _raw_post(url: str, body: dict) -> socket.socket:
    """Send a request on a plain socket (closing it is a client that goes away)."""
    parts, data = urlsplit(url), json.dumps(body).encode()
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (GENERATIONS.encode(), parts.netloc.encode(), len(data), data))
    return sock


def test_queue_limit_429_and_a_client_that_leaves_cancels_its_job(onnx_fp32: Path, ort_pipe: Pipeline) -> None:
    app = create_app(settings(onnx_fp32, max_batch=1, batch_window_ms=0, max_queue=1), pipeline=ort_pipe)
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        slow = _raw_post(srv.url, {"prompt": "slow", "size": "64x64", "steps": 500})
        wait_until(lambda: app.state.host.stats().running == 1, what="slow request running")
        queued: list = []
        t = threading.Thread(target=lambda: queued.append(c.post(GENERATIONS, json={"prompt": "q", **SMALL})))
        t.start()
        wait_until(lambda: app.state.host.stats().queue_depth == 1, what="second request queued")
        full = c.post(GENERATIONS, json={"prompt": "one too many", **SMALL})
        assert full.status_code == 429 and "max_queue=1" in full.json()["error"]["message"]
        assert full.headers["retry-after"] == "1"
        slow.close()  # the client goes away mid-generation
        t.join(60)
        assert queued[0].status_code == 200  # served right after the cancelled one stopped
        stats = app.state.host.stats()
        assert stats.stopped_mid_run == 1 and stats.completed == 1 and stats.rejected == 1
        wait_until(lambda: metric(c, "sd35trt_requests_total", status="499") == 1, what="499 counted")
        assert metric(c, "sd35trt_jobs_total", outcome="cancelled") == 1


def test_timeout_gets_504_and_stops_the_job(onnx_fp32: Path, ort_pipe: Pipeline) -> None:
    limits = Limits(max_size=256, max_steps=1000, timeout_s=1.0)
    app = create_app(settings(onnx_fp32, limits=limits), pipeline=ort_pipe)
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post(GENERATIONS, json={"prompt": "too slow", "size": "64x64", "steps": 1000})  # ~15 s of work
        assert r.status_code == 504 and "timeout of 1 s" in r.json()["error"]["message"]
        wait_until(lambda: app.state.host.stats().cancelled == 1, what="timed-out job stopped")
        assert app.state.host.stats().completed == 0  # stopped (mid-run, or before it started), not finished
        assert c.post(GENERATIONS, json={"prompt": "fine", **SMALL}).status_code == 200


def _corrupt_transformer(folder: Path) -> str:
    (folder / "transformer.onnx").write_bytes(b"\x08\x07garbage, not a protobuf graph")
    return "transformer.onnx"


def _drop_vae_decoder(folder: Path) -> str:
    (folder / "vae_decoder.onnx").unlink()
    return "vae_decoder.onnx"


def _foreign_manifest(folder: Path) -> str:
    doc = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**doc, "format": "someone-else/3"}))
    return "manifest.json"


@pytest.mark.parametrize("damage", [_corrupt_transformer, _drop_vae_decoder, _foreign_manifest])
def test_a_model_that_fails_to_load_is_reported_not_ready(onnx_fp32: Path, tmp_path: Path, damage) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(onnx_fp32, broken)
    culprit = damage(broken)
    with BackgroundServer(create_app(settings(broken))) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        wait_until(lambda: c.get("/readyz").json()["status"] != "loading", what="load finished")
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert culprit in ready.json()["error"] and "CheckpointError" in ready.json()["error"]
        r = c.post(GENERATIONS, json={"prompt": "a", **SMALL})
        assert r.status_code == 503 and culprit in r.json()["error"]["message"]
        assert c.get("/healthz").status_code == 200 and metric(c, "sd35trt_ready") == 0.0


def test_an_engine_set_that_cannot_run_here_is_reported_not_ready(engines_fp8: dict) -> None:
    folder = engines_fp8["sm89"][0]  # TensorRT-RTX engines for an RTX 40xx, built on this CPU
    app = create_app(ServeSettings(model=folder, engines=True))  # backend: the set's flavor
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        wait_until(lambda: c.get("/readyz").json()["status"] != "loading", what="load finished")
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "EngineSetError" in ready.json()["error"]
        assert "tensorrt-rtx" in ready.json()["error"]  # no CUDA GPU here, or not an sm89 one
        assert c.post(GENERATIONS, json={"prompt": "a", **SMALL}).status_code == 503
    caps = app.state.host.caps  # read from the manifest before loading: static 128x128, batch 1
    assert (caps.max_batch, caps.min_size, caps.max_size) == (1, 128, 128)


@pytest.mark.parametrize("exc,status,kind", [
    (FieldError("size", "too big"), 400, "invalid_request_error"),
    (InvalidInputError("height=65 is not a multiple of 16"), 400, "invalid_request_error"),
    (QueueFullError("64 requests wait"), 429, "queue_full"),
    (ClosedError("shutting down"), 503, "unavailable"),
    (OutOfMemoryError("transformer.onnx: out of memory"), 503, "out_of_memory"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 503, "out_of_memory"),
    (MemoryError(), 503, "out_of_memory"),
    (NonFiniteLatentsError(3, 0.5, "onnxruntime"), 500, "generation_error"),
    (BackendError("transformer.onnx: ONNX Runtime failed"), 500, "generation_error"),
    (RuntimeError("something unforeseen"), 500, "generation_error"),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v))
def test_typed_errors_map_to_http_codes(exc: BaseException, status: int, kind: str) -> None:
    r = error_response(exc, timeout_s=30)
    body = json.loads(r.body)["error"]
    assert r.status_code == status and body["type"] == kind
    assert str(exc) in body["message"]  # the runtime's own words (value + fix) reach the client
