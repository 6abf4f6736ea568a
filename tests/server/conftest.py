"""A real server on 127.0.0.1 (uvicorn on a background thread, a free port) over the tiny ONNX export."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="pip install 'sd35trt[serve]' (in the test extra) runs the server")
pytest.importorskip("onnxruntime", reason="onnxruntime (test extra) runs the exported graphs")

import httpx  # noqa: E402
from harness import settings  # noqa: E402

from sd35trt.runtime import Pipeline  # noqa: E402
from sd35trt.server import BackgroundServer, create_app  # noqa: E402


@pytest.fixture(scope="session")
def ort_pipe(onnx_fp32: Path) -> Pipeline:
    """One loaded pipeline for every server of the session (an app handed a pipeline never closes it)."""
    return Pipeline.from_pretrained(onnx_fp32, backend="onnxruntime")


@pytest.fixture(scope="module")
def server(onnx_fp32: Path, ort_pipe: Pipeline):
    with BackgroundServer(create_app(settings(onnx_fp32), pipeline=ort_pipe)) as srv:
        yield srv


@pytest.fixture()
def client(server: BackgroundServer):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
