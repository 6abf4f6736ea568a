"""Load on 127.0.0.1: 200 requests, 16 at a time (httpx, asyncio), batching on and then off.

Bounded: 200 requests per run, 60 s per request, 240 s per run. Prints p50/p99 latency,
throughput and the on/off throughput ratio (recorded in BENCHMARKS.md, "Serving on the CPU").
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from harness import CONCURRENCY, REQUESTS, Run, load, metric, settings

from sd35trt.runtime import Pipeline
from sd35trt.server import BackgroundServer, create_app


def _serve_and_load(onnx: Path, pipe: Pipeline, **batching) -> tuple[Run, dict[str, float]]:
    app = create_app(settings(onnx, max_queue=CONCURRENCY, **batching), pipeline=pipe)
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        run = asyncio.run(load(srv.url))
        seen = {name: metric(c, name, **labels) for name, labels in (
            ("sd35trt_requests_total", {"status": "200"}), ("sd35trt_request_latency_seconds_count", {}),
            ("sd35trt_batches_total", {}), ("sd35trt_batch_size_sum", {}), ("sd35trt_batch_size_count", {}))}
    return run, seen


# (workers, ONNX Runtime intra-op threads): the CLI's defaults, and two single-threaded batch
# runners on the two cores of the CI machine
CONFIGS = {"1-worker-ort-default-threads": (1, None), "2-workers-1-thread": (2, 1)}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_200_requests_16_concurrent_batching_on_and_off(onnx_fp32: Path, config: str, capsys) -> None:
    workers, threads = CONFIGS[config]
    pipe = Pipeline.from_pretrained(onnx_fp32, backend="onnxruntime", intra_op_threads=threads)
    pipe("warm-up", height=64, width=64, num_inference_steps=2, output_type="np", progress=False)
    on, m_on = _serve_and_load(onnx_fp32, pipe, max_batch=4, batch_window_ms=10, workers=workers)
    off, m_off = _serve_and_load(onnx_fp32, pipe, max_batch=1, batch_window_ms=0, workers=workers)
    pipe.close()
    ratio = off.seconds / on.seconds
    mean_batch = m_on["sd35trt_batch_size_sum"] / m_on["sd35trt_batches_total"]
    with capsys.disabled():
        print(f"\n[load {config}, 64x64, 2 steps, CFG: {on.line('batching on (max 4, 10 ms)')}; "
              f"mean batch {mean_batch:.2f}]\n[load {config}: {off.line('batching off')}]"
              f"\n[load {config}: throughput on/off = {ratio:.2f}x]")
    for run, m in ((on, m_on), (off, m_off)):
        assert len(run.statuses) == REQUESTS and run.statuses == [200] * REQUESTS  # no 5xx, nothing lost
        assert run.sizes == [(64, 64)] * REQUESTS
        assert m["sd35trt_requests_total"] == REQUESTS and m["sd35trt_request_latency_seconds_count"] == REQUESTS
        assert m["sd35trt_batch_size_sum"] == REQUESTS  # every image went through exactly one batch
    assert m_off["sd35trt_batches_total"] == REQUESTS
    assert mean_batch > 1.5  # 16 clients keep the batcher fed: most calls carry several images
