"""Helpers of the server tests (imported by them; the fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from sd35trt.server import Limits, ServeSettings

SMALL = {"size": "64x64", "steps": 2, "response_format": "png"}  # tiny and quick, answered with the raw PNG
GENERATIONS = "/v1/images/generations"


def settings(model: Path, **kw) -> ServeSettings:
    limits = kw.pop("limits", Limits(max_size=256, max_steps=500, max_prompt_chars=300, timeout_s=60))
    return ServeSettings(model=model, backend="onnxruntime", limits=limits, **kw)


def wait_until(predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        time.sleep(0.02)


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """One sample of the server's /metrics, read with prometheus_client's own parser (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


REQUESTS, CONCURRENCY = 200, 16


@dataclass
class Run:
    statuses: list[int]
    latencies: list[float]
    sizes: list[tuple[int, int]]
    seconds: float

    def line(self, name: str) -> str:
        p50, p99 = np.percentile(self.latencies, [50, 99]) * 1000
        return (f"{name}: p50 {p50:.0f} ms, p99 {p99:.0f} ms, {REQUESTS / self.seconds:.1f} req/s "
                f"({REQUESTS} requests in {self.seconds:.1f} s)")


async def load(url: str, body: dict | None = None) -> Run:
    """REQUESTS requests (seed i, one of 7 prompts), CONCURRENCY at a time; bounded: 60 s a request,
    240 s in all."""
    todo: asyncio.Queue[int] = asyncio.Queue()
    for i in range(REQUESTS):
        todo.put_nowait(i)
    statuses, latencies, sizes = [], [], []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not todo.empty():
            i = todo.get_nowait()
            req = {"prompt": f"load test prompt {i % 7}", "seed": i, **(body or SMALL)}
            t0 = time.perf_counter()
            r = await client.post(GENERATIONS, json=req)
            latencies.append(time.perf_counter() - t0)
            statuses.append(r.status_code)
            if r.status_code == 200:
                sizes.append(Image.open(io.BytesIO(r.content)).size)

    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client_loop(client) for _ in range(CONCURRENCY))), 240)
        return Run(statuses, latencies, sizes, time.perf_counter() - t0)
