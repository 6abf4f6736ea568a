"""One Pipeline shared by many threads and by an event loop (ONNX Runtime backend, tiny checkpoint)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from sd35trt.runtime import Pipeline
from sd35trt.runtime.errors import ClosedError

pytest.importorskip("onnxruntime", reason="onnxruntime (test extra) runs the exported graphs")
KW = dict(height=64, width=64, num_inference_steps=2, guidance_scale=4.5, output_type="np", progress=False)
PROMPTS = ("a lighthouse at dusk", "a red fox in snow")
SEEDS = 40  # distinct seeds; 200 requests reuse them in different orders on different threads


@pytest.fixture(scope="module")
def pipe(onnx_fp32: Path) -> Pipeline:
    return Pipeline.from_pretrained(onnx_fp32, backend="onnxruntime")


def _image(pipe: Pipeline, seed: int) -> np.ndarray:
    return pipe(PROMPTS[seed % 2], negative_prompt=f"blurry {seed % 3}", generator=torch.Generator().manual_seed(seed),
                **KW).images


def test_eight_threads_times_25_requests_match_single_threaded(pipe: Pipeline, capsys) -> None:
    expected = {s: _image(pipe, s) for s in range(SEEDS)}
    assert np.abs(expected[0] - expected[2]).max() > 0.01  # seeds really change the image
    start = threading.Barrier(8)

    def worker(t: int) -> list[tuple[int, np.ndarray]]:
        start.wait()  # all 8 threads call the pipeline at the same time
        return [(s, _image(pipe, s)) for s in ((t * 11 + i * 7) % SEEDS for i in range(25))]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(worker, range(8)) for r in rs]
    elapsed = time.perf_counter() - t0
    worst = max(float(np.abs(img - expected[s]).max()) for s, img in results)
    with capsys.disabled():
        print(f"\n[threads: 8 x 25 requests in {elapsed:.1f}s; max abs diff vs single-threaded: {worst:.1e}]")
    assert len(results) == 200 and len({s for s, _ in results}) == SEEDS
    assert worst <= 1e-6


def test_generate_async_keeps_the_loop_free_and_matches_the_call(pipe: Pipeline) -> None:
    async def main() -> tuple[list[np.ndarray], float]:
        gaps, stop = [], asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        outs = await asyncio.gather(*(pipe.generate_async(
            PROMPTS[s % 2], negative_prompt=f"blurry {s % 3}", generator=torch.Generator().manual_seed(s), **KW)
            for s in range(6)))
        stop.set()
        await tick
        return [o.images for o in outs], max(gaps)

    images, worst_gap = asyncio.run(main())
    for s, img in enumerate(images):
        assert np.abs(img - _image(pipe, s)).max() <= 1e-6
    assert worst_gap < 0.25  # six generations ran while the loop kept ticking every 5 ms


def test_cancelling_the_awaiting_task_stops_the_generation(pipe: Pipeline) -> None:
    steps: list[int] = []

    async def main() -> None:
        task = asyncio.create_task(pipe.generate_async(
            "a slow one", height=64, width=64, num_inference_steps=400, output_type="latent",
            callback_on_step_end=lambda p, i, t, kw: steps.append(i)))
        while not steps:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    seen = len(steps)
    time.sleep(0.3)  # the worker thread stopped after its current step: no step runs any more
    assert len(steps) == seen and seen < 400


def test_close_waits_for_running_calls_then_refuses(onnx_fp32: Path) -> None:
    pipe = Pipeline.from_pretrained(onnx_fp32, backend="onnxruntime")
    started, result = threading.Event(), {}

    def long_call() -> None:
        result["out"] = pipe("a long one", height=64, width=64, num_inference_steps=60, output_type="np",
                             callback_on_step_end=lambda p, i, t, kw: started.set(), progress=False)

    worker = threading.Thread(target=long_call)
    worker.start()
    assert started.wait(30)
    pipe.close()  # returns only once the running call is done
    assert result["out"].images.shape == (1, 64, 64, 3) and np.isfinite(result["out"].images).all()
    worker.join()
    with pytest.raises(ClosedError, match="closed"):
        pipe("after close", **KW)
    with pytest.raises(ClosedError, match="closed"):
        asyncio.run(pipe.generate_async("after close", **KW))
