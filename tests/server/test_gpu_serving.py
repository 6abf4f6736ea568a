"""The server on a CUDA GPU (torch backend, tiny checkpoint): batching, twins, the GPU memory
gauge, and the load figures. Run on the device machine: `pytest -m gpu tests/server -s`."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from harness import CONCURRENCY, GENERATIONS, REQUESTS, load, metric, wait_until
from PIL import Image

from sd35trt.server import BackgroundServer, Limits, ServeSettings, create_app

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device machine)")]
BODY = {"size": "64x64", "steps": 4, "response_format": "png"}  # the raw PNG


def _app(model: Path, **kw):
    return create_app(ServeSettings(model=model, backend="torch", backend_options={"device": "cuda"},
                                    max_queue=CONCURRENCY, limits=Limits(timeout_s=120), **kw))


def _serving(c: httpx.Client) -> None:
    wait_until(lambda: c.get("/readyz").status_code == 200, 120, "model loaded on the GPU")


def test_batch_on_the_gpu_equals_its_twins_and_reports_gpu_memory(tiny_medium: Path, capsys) -> None:
    app = _app(tiny_medium, max_batch=4, batch_window_ms=2000)
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        _serving(c)
        bodies = [{"prompt": p, "seed": 50 + i, **BODY} for i, p in enumerate(["a", "b fox", "c cat", "d"])]

        async def post_all():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as ac:
                return await asyncio.gather(*(ac.post(GENERATIONS, json=b) for b in bodies))

        responses = asyncio.run(post_all())
        assert [r.status_code for r in responses] == [200] * 4 and metric(c, "sd35trt_batches_total") == 1
        used = metric(c, "sd35trt_gpu_memory_bytes", device="0", kind="used")
        total = metric(c, "sd35trt_gpu_memory_bytes", device="0", kind="total")
        pipe = app.state.host.pipe
        diffs = []
        for b, r in zip(bodies, responses):
            gen = torch.Generator().manual_seed(b["seed"])  # a direct call, not via Job.call_kwargs
            alone = np.asarray(pipe(b["prompt"], height=64, width=64, num_inference_steps=4, generator=gen,
                                    progress=False).images[0], dtype=np.int16)
            diffs.append(int(np.abs(np.asarray(Image.open(io.BytesIO(r.content)), dtype=np.int16) - alone).max()))
    with capsys.disabled():
        print(f"\n[gpu {torch.cuda.get_device_name(0)}: batch of 4 vs alone, max 8-bit diff per image {diffs}; "
              f"gauge used {used / 2**30:.2f} GiB of {total / 2**30:.1f} GiB]")
    assert 0 < used < total
    assert max(diffs) <= 2  # bf16: a batch of 4 may pick other GEMM kernels than a batch of 1


def test_load_on_the_gpu_batching_on_and_off(tiny_medium: Path, capsys) -> None:
    runs = {}
    for name, kw in (("on", dict(max_batch=4, batch_window_ms=10)), ("off", dict(max_batch=1, batch_window_ms=0))):
        with BackgroundServer(_app(tiny_medium, **kw)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
            _serving(c)
            c.post(GENERATIONS, json={"prompt": "warm-up", **BODY})
            runs[name] = asyncio.run(load(srv.url, BODY))
            assert runs[name].statuses == [200] * REQUESTS
    with capsys.disabled():
        print(f"\n[gpu load, 64x64, 4 steps, bf16: {runs['on'].line('batching on')}]"
              f"\n[gpu load: {runs['off'].line('batching off')}]"
              f"\n[gpu load: throughput on/off = {runs['off'].seconds / runs['on'].seconds:.2f}x]")
