"""Prometheus metrics of one server, in a registry the app owns (never the process-global one).

Request count by status and the latency histogram are updated per request; queue depth, batch
sizes, job outcomes, readiness and GPU memory are read from their sources at scrape time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..runtime.batching import BatcherStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _Runtime(Collector):
    """Batcher counters and readiness, read when scraped."""

    def __init__(self, stats: Callable[[], BatcherStats | None], ready: Callable[[], bool], max_batch: Callable[[], int],
                 memory_mode: Callable[[], str] = lambda: "default"):
        self.stats, self.ready, self.max_batch, self.memory_mode = stats, ready, max_batch, memory_mode

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        yield GaugeMetricFamily("sd35trt_ready", "1 when the model is loaded and the server takes requests",
                                value=1.0 if self.ready() else 0.0)
        mode = GaugeMetricFamily("sd35trt_memory_mode", "1 for the memory mode the pipeline runs in "
                                 "(default, balanced, low)", labels=["mode"])
        mode.add_metric([self.memory_mode()], 1.0)
        yield mode
        yield GaugeMetricFamily("sd35trt_queue_depth", "requests waiting for a batch", value=s.queue_depth if s else 0)
        yield GaugeMetricFamily("sd35trt_running_requests", "requests in the batch being generated",
                                value=s.running if s else 0)
        yield CounterMetricFamily("sd35trt_batches", "pipeline calls made by the micro-batcher", value=s.batches if s else 0)
        jobs = CounterMetricFamily("sd35trt_jobs", "requests handled by the micro-batcher, by outcome", labels=["outcome"])
        for outcome in ("completed", "failed", "cancelled", "rejected"):
            jobs.add_metric([outcome], getattr(s, outcome) if s else 0)
        yield jobs
        yield CounterMetricFamily("sd35trt_jobs_retried_alone", "requests of out-of-memory batches run again one by one",
                                  value=s.retried_alone if s else 0)
        yield _batch_histogram(s.batch_sizes if s else {}, self.max_batch())
        yield from _by_mode(s)


MODES = ("text-to-image", "image-to-image", "inpainting")


def _by_mode(s: BatcherStats | None) -> Iterator[Metric]:
    """Batches and images by mode and skip-layer guidance (every pair listed, 0 until it runs)."""
    for name, doc, counts in (
            ("sd35trt_mode_batches", "pipeline calls by mode and skip-layer guidance (on/off)",
             s.mode_batches if s else {}),
            ("sd35trt_mode_images", "images of completed requests by mode and skip-layer guidance (on/off)",
             s.mode_images if s else {})):
        family = CounterMetricFamily(name, doc, labels=["mode", "slg"])
        for mode in MODES:
            for slg in ("off", "on"):
                family.add_metric([mode, slg], counts.get((mode, slg), 0))
        yield family


def _batch_histogram(sizes: dict[int, int], max_batch: int) -> HistogramMetricFamily:
    h = HistogramMetricFamily("sd35trt_batch_size", "images per pipeline call")
    edges = sorted(set(range(1, max(max_batch, max(sizes, default=1)) + 1)))
    cumulative, buckets = 0, []
    for edge in edges:
        cumulative += sizes.get(edge, 0)
        buckets.append((str(float(edge)), cumulative))
    buckets.append(("+Inf", sum(sizes.values())))
    h.add_metric([], buckets, sum_value=float(sum(k * v for k, v in sizes.items())))
    return h


class _GpuMemory(Collector):
    """Used and total memory of every visible CUDA device (all allocators: torch, TensorRT, ORT)."""

    def collect(self) -> Iterator[Metric]:
        import torch

        g = GaugeMetricFamily("sd35trt_gpu_memory_bytes", "GPU memory by device", labels=["device", "kind"])
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            g.add_metric([str(i), "used"], total - free)
            g.add_metric([str(i), "total"], total)
            g.add_metric([str(i), "peak_allocated"], torch.cuda.max_memory_allocated(i))  # torch's, since start
        yield g


class Metrics:
    def __init__(self, stats: Callable[[], BatcherStats | None], ready: Callable[[], bool],
                 max_batch: Callable[[], int], gpu: bool, memory_mode: Callable[[], str] = lambda: "default") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("sd35trt_requests", "image requests (generations and edits) by HTTP status", ["status"],
                                registry=self.registry)
        self.latency = Histogram("sd35trt_request_latency_seconds", "time until the response to an image request starts",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_Runtime(stats, ready, max_batch, memory_mode))
        if gpu:
            self.registry.register(_GpuMemory())

    def observe(self, status: int, seconds: float) -> None:
        self.requests.labels(str(status)).inc()
        self.latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware: counts and times every request to `paths` (whatever answers it: the route,
    FastAPI's validation, an error) when its response starts, so a client holding a response also
    finds it counted. Pure ASGI, so the route still sees client disconnects."""

    def __init__(self, app, metrics: Metrics, paths: tuple[str, ...]) -> None:
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        t0, recorded = time.perf_counter(), False

        async def send_and_record(message) -> None:
            nonlocal recorded
            if message["type"] == "http.response.start" and not recorded:
                recorded = True
                self.metrics.observe(message["status"], time.perf_counter() - t0)
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except asyncio.CancelledError:  # the server stopped the request: its client left (Ray Serve's proxy)
            if not recorded:
                recorded = True
                self.metrics.observe(499, time.perf_counter() - t0)
            raise
        finally:
            if not recorded:  # the app failed before answering: uvicorn sends a 500
                self.metrics.observe(500, time.perf_counter() - t0)
