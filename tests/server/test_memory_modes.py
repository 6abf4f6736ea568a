"""The server in memory="low" (torch backend, tiny checkpoint, CPU): it serves batches stage by
stage and /metrics names the mode."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from harness import GENERATIONS, metric
from PIL import Image

from sd35trt.runtime import Pipeline
from sd35trt.server import BackgroundServer, Limits, ServeSettings, create_app


@pytest.mark.parametrize("mode", ["low"])
def test_server_in_low_mode(tiny_medium: Path, mode: str) -> None:
    import io

    pipe = Pipeline.from_pretrained(tiny_medium, backend="torch", device="cpu", dtype=torch.float32, memory=mode)
    settings = ServeSettings(model=tiny_medium, backend="torch", backend_options={"memory": mode},
                             batch_window_ms=300, limits=Limits(timeout_s=120))
    body = {"prompt": "a red fox", "size": "64x64", "steps": 2, "response_format": "png", "seed": 4}
    with BackgroundServer(create_app(settings, pipeline=pipe)) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        r = c.post(GENERATIONS, json=body)
        assert r.status_code == 200
        assert metric(c, "sd35trt_memory_mode", mode=mode) == 1.0
        assert metric(c, "sd35trt_memory_mode", mode="default") == 0.0
    stages = [s for s, _ in pipe.backend.residency_report()]
    assert stages[-2:] == ["transformer", "vae"] and "clip_l" in stages
    served = np.asarray(Image.open(io.BytesIO(r.content)))
    default = Pipeline.from_pretrained(tiny_medium, backend="torch", device="cpu", dtype=torch.float32)
    alone = default("a red fox", height=64, width=64, num_inference_steps=2, progress=False,
                    generator=torch.Generator().manual_seed(4)).images[0]
    assert np.array_equal(served, np.asarray(alone))
