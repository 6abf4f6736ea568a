"""MicroBatcher on the real ONNX Runtime pipeline: grouping, twins, queue bound, cancel, close."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sd35trt.runtime import GenerationCancelled, InvalidInputError, Pipeline
from sd35trt.runtime.batching import Job, MicroBatcher
from sd35trt.runtime.errors import ClosedError, QueueFullError

pytest.importorskip("onnxruntime", reason="onnxruntime (test extra) runs the exported graphs")
SHAPE = dict(height=64, width=64, steps=3, output_type="np")


@pytest.fixture(scope="module")
def pipe(onnx_fp32: Path) -> Pipeline:
    return Pipeline.from_pretrained(onnx_fp32, backend="onnxruntime")


def _twin(pipe: Pipeline, job: Job) -> np.ndarray:
    """The job run alone by a direct call, image i drawn from `torch.Generator().manual_seed(seed + i)`
    (not through `Job.call_kwargs`/`seed_generators`, which the batcher itself uses)."""
    generators = [torch.Generator().manual_seed(job.seed + i) for i in range(job.n)]
    return pipe(job.prompt, negative_prompt=job.negative_prompt, height=job.height, width=job.width,
                num_inference_steps=job.steps, num_images_per_prompt=job.n, generator=generators,
                output_type=job.output_type, sampler=job.sampler, image=job.image, mask_image=job.mask,
                strength=job.strength, guidance_scale=job.guidance,
                skip_guidance_layers=job.skip_guidance_layers,
                skip_layer_guidance_scale=job.skip_layer_guidance_scale,
                skip_layer_guidance_start=job.skip_layer_guidance_start,
                skip_layer_guidance_stop=job.skip_layer_guidance_stop, progress=False).images


def _submit_together(batcher: MicroBatcher, jobs: list[Job]) -> list:
    barrier, tickets = threading.Barrier(len(jobs)), [None] * len(jobs)

    def submit(i: int) -> None:
        barrier.wait()
        tickets[i] = batcher.submit(jobs[i])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tickets


def test_four_concurrent_requests_run_as_one_batch_and_equal_their_twins(pipe: Pipeline, capsys) -> None:
    jobs = [Job("a lighthouse at dusk", "blurry", seed=3, **SHAPE), Job("a red fox in snow", None, seed=11, **SHAPE),
            Job("a bowl of ramen", "text, watermark", seed=12, **SHAPE), Job("a castle", "fog", seed=900, **SHAPE)]
    with MicroBatcher(pipe, max_batch=4, window_ms=2000) as batcher:  # 4 images fill the batch: no wait
        outs = [t.result(60) for t in _submit_together(batcher, jobs)]
        stats = batcher.stats()
    assert stats.batches == 1 and stats.batch_sizes == {4: 1} and stats.completed == 4
    diffs = [float(np.abs(o.images - _twin(pipe, j)).max()) for o, j in zip(outs, jobs)]
    with capsys.disabled():
        print(f"\n[batch of 4 vs unbatched twins, max abs diff per image: {diffs}]")
    assert all(o.info["batch_images"] == 4 for o in outs)
    assert max(diffs) <= 1e-5
    assert np.abs(outs[0].images - outs[1].images).max() > 0.01  # the images differ: a mix-up would show


def test_n_images_use_consecutive_seeds_in_a_batch_and_alone(pipe: Pipeline) -> None:
    jobs = [Job("two foxes", seed=40, n=2, **SHAPE), Job("one cat", seed=41, **SHAPE), Job("one dog", seed=7, **SHAPE)]
    with MicroBatcher(pipe, max_batch=4, window_ms=2000) as batcher:
        outs = [t.result(60) for t in _submit_together(batcher, jobs)]
        assert batcher.stats().batch_sizes == {4: 1}
    assert outs[0].images.shape == (2, 64, 64, 3) and outs[0].info["seeds"] == [40, 41]
    for o, j in zip(outs, jobs):
        assert np.abs(o.images - _twin(pipe, j)).max() <= 1e-5
    # image 1 of seed 40 is the single image of seed 41 (same prompt): the documented convention
    same = _twin(pipe, Job("two foxes", seed=41, **SHAPE))
    assert np.abs(outs[0].images[1] - same[0]).max() <= 1e-5


def test_different_shapes_do_not_share_a_batch(pipe: Pipeline) -> None:
    jobs = [Job("a", seed=1, **SHAPE), Job("b", seed=2, **{**SHAPE, "width": 96}),
            Job("c", seed=3, **SHAPE), Job("d", seed=4, **{**SHAPE, "width": 96})]
    with MicroBatcher(pipe, max_batch=4, window_ms=300) as batcher:
        outs = [t.result(60) for t in _submit_together(batcher, jobs)]
        stats = batcher.stats()
    assert stats.batches == 2 and stats.batch_sizes == {2: 2}
    assert [o.images.shape[2] for o in outs] == [64, 96, 64, 96]


def test_jobs_batch_by_sampler_and_batched_sde_jobs_equal_their_twins(pipe: Pipeline, capsys) -> None:
    jobs = [Job("a castle", "fog", seed=3, sampler="dpmpp_2m_sde", **SHAPE),
            Job("a bowl of ramen", None, seed=9, n=2, sampler="dpmpp_2m_sde", **SHAPE),
            Job("a castle", "fog", seed=3, sampler="heun", **SHAPE)]
    with MicroBatcher(pipe, max_batch=3, window_ms=500) as batcher:
        outs = [t.result(60) for t in _submit_together(batcher, jobs)]  # the SDE jobs fill a batch
        stats = batcher.stats()
    assert stats.batches == 2 and stats.batch_sizes == {3: 1, 1: 1}  # the heun job ran on its own
    assert [o.info["sampler"] for o in outs] == ["dpmpp_2m_sde", "dpmpp_2m_sde", "heun"]
    diffs = [float(np.abs(o.images - _twin(pipe, j)).max()) for o, j in zip(outs, jobs)]
    with capsys.disabled():
        print(f"\n[sde batch of 3 + heun job vs unbatched twins, max abs diff per job: {diffs}]")
    assert max(diffs) <= 1e-6
    assert np.abs(outs[0].images - outs[2].images).max() > 0.01  # same seed, other sampler


def test_bad_jobs_are_refused_at_submit(pipe: Pipeline) -> None:
    with MicroBatcher(pipe, max_batch=2) as batcher:
        with pytest.raises(InvalidInputError, match="height=65"):
            batcher.submit(Job("x", height=65, width=64))
        with pytest.raises(InvalidInputError, match="n=3 images exceed max_batch=2"):
            batcher.submit(Job("x", n=3, **SHAPE))
        with pytest.raises(InvalidInputError, match="sampler='dpm'"):
            batcher.submit(Job("x", sampler="dpm", **SHAPE))
        assert batcher.stats().batches == 0
    with pytest.raises(InvalidInputError, match="max_batch=0"):
        MicroBatcher(pipe, max_batch=0)


def test_full_queue_is_refused_and_waiting_jobs_can_be_cancelled(pipe: Pipeline) -> None:
    batcher = MicroBatcher(pipe, max_batch=4, window_ms=10_000, max_queue=2)  # jobs wait for the window
    waiting = [batcher.submit(Job(p, seed=i, **SHAPE)) for i, p in enumerate("ab")]
    with pytest.raises(QueueFullError, match="max_queue=2"):
        batcher.submit(Job("c", **SHAPE))
    assert batcher.stats().queue_depth == 2
    for t in waiting:
        t.cancel()
    stats = batcher.stats()
    assert (stats.queue_depth, stats.cancelled, stats.rejected, stats.batches) == (0, 2, 1, 0)
    assert all(t.future.cancelled() for t in waiting)
    batcher.close()


def test_a_running_batch_stops_when_its_jobs_are_cancelled(pipe: Pipeline) -> None:
    with MicroBatcher(pipe, max_batch=1, window_ms=0) as batcher:
        ticket = batcher.submit(Job("slow", **{**SHAPE, "steps": 400}))
        deadline = time.monotonic() + 30
        while batcher.stats().running == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        ticket.cancel()
        with pytest.raises(GenerationCancelled) as info:
            ticket.result(30)
        assert info.value.step < 399
        after = batcher.submit(Job("next", seed=5, **SHAPE)).result(60)  # the batcher still serves
        stats = batcher.stats()
    assert after.images.shape == (1, 64, 64, 3)
    assert stats.stopped_mid_run == 1 and stats.cancelled == 1 and stats.completed == 1


def test_close_runs_the_queued_jobs_then_refuses(pipe: Pipeline) -> None:
    batcher = MicroBatcher(pipe, max_batch=2, window_ms=10_000)
    tickets = [batcher.submit(Job(p, seed=i, **SHAPE)) for i, p in enumerate("xyz")]
    batcher.close()  # does not wait for the 10 s window: closing runs what is queued at once
    assert all(t.result(0).images.shape == (1, 64, 64, 3) for t in tickets)
    assert batcher.stats().batch_sizes == {2: 1, 1: 1}
    with pytest.raises(ClosedError, match="shutting down"):
        batcher.submit(Job("late", **SHAPE))


def test_a_batch_that_runs_out_of_memory_is_rerun_job_by_job(onnx_fp32: Path) -> None:
    """ONNX Runtime's CPU arena capped at 48 MiB (in a child process): four 192x192 requests do not
    fit as one batch, each fits alone; all four succeed, equal to their unbatched twins."""
    import json
    import subprocess
    import sys

    script = Path(__file__).with_name("oom_batch.py")
    out = subprocess.run([sys.executable, str(script), str(onnx_fp32), "48", "192"], capture_output=True,
                         text=True, timeout=600, check=True).stdout.strip().splitlines()[-1]
    got = json.loads(out)
    assert got["sizes"] == {"4": 1, "1": 4}, got  # the batch of 4 ran, then each job alone
    assert got["retried_alone"] == 4 and got["completed"] == 4 and got["failed"] == 0, got
    assert got["max_diff"] == 0.0, got


def _picture(seed: int, size: int = 64):
    """A deterministic RGB PIL picture (smooth noise, upsampled)."""
    from PIL import Image

    small = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BILINEAR)


def _mask(top: int):
    from PIL import Image

    m = np.zeros((64, 64), np.uint8)
    m[top:top + 24, 16:48] = 255  # white = repaint
    return Image.fromarray(m, "L")


def test_edits_batch_by_mode_strength_and_image_size_and_equal_their_twins(pipe: Pipeline) -> None:
    edit = dict(SHAPE, steps=4)
    jobs = [Job("a fox", seed=1, n=2, image=_picture(1), **edit),  # these two share a batch (3 images) ...
            Job("a cat", seed=7, image=_picture(2), **edit),
            Job("a cat", seed=7, image=_picture(2), strength=0.8, **edit),  # ... the others each run alone
            Job("a cat", seed=7, image=_picture(2), mask=_mask(8), **edit),
            Job("a cat", seed=7, image=_picture(2, size=80), **edit),  # another source size
            Job("a cat", seed=7, **edit)]
    with MicroBatcher(pipe, max_batch=4, window_ms=500) as batcher:
        outs = [t.result(60) for t in _submit_together(batcher, jobs)]
        stats = batcher.stats()
    assert stats.batches == 5 and stats.batch_sizes == {3: 1, 1: 4}
    assert stats.mode_batches == {("image-to-image", "off"): 3, ("inpainting", "off"): 1, ("text-to-image", "off"): 1}
    assert stats.mode_images == {("image-to-image", "off"): 5, ("inpainting", "off"): 1, ("text-to-image", "off"): 1}
    assert [o.info["mode"] for o in outs] == ["image-to-image"] * 3 + ["inpainting", "image-to-image", "text-to-image"]
    diffs = [float(np.abs(o.images - _twin(pipe, j)).max()) for o, j in zip(outs, jobs)]
    assert max(diffs) <= 1e-5, diffs
    # strength, mask and no image each change the image (the 80x80 source resized is about the same picture)
    assert min(float(np.abs(outs[1].images - outs[k].images).max()) for k in (2, 3, 5)) > 0.01


def test_inpainting_edits_with_different_images_and_masks_batch_together(pipe: Pipeline) -> None:
    jobs = [Job(p, seed=20 + i, image=_picture(10 + i), mask=_mask(4 + 10 * i), strength=0.75, **dict(SHAPE, steps=4))
            for i, p in enumerate(["a hat", "a door", "snow", "a bird"])]
    with MicroBatcher(pipe, max_batch=4, window_ms=2000) as batcher:
        outs = [t.result(60) for t in _submit_together(batcher, jobs)]
        stats = batcher.stats()
    assert stats.batches == 1 and stats.batch_sizes == {4: 1} and stats.mode_images == {("inpainting", "off"): 4}
    diffs = [float(np.abs(o.images - _twin(pipe, j)).max()) for o, j in zip(outs, jobs)]
    assert max(diffs) <= 1e-5, diffs


def test_skip_layer_guidance_settings_are_part_of_the_batch_key(tiny_medium: Path) -> None:
    import torch

    slg = dict(SHAPE, steps=6, guidance=4.0, skip_guidance_layers=(1, 2), skip_layer_guidance_stop=0.6)
    jobs = [Job("a fox", seed=1, **slg), Job("a cat", seed=2, **slg),
            Job("a cat", seed=2, **{**slg, "skip_layer_guidance_scale": 1.0}),
            Job("a cat", seed=2, **{**slg, "skip_guidance_layers": None, "skip_layer_guidance_stop": 0.2})]
    with Pipeline.from_pretrained(tiny_medium, backend="torch", device="cpu", dtype=torch.float32) as tp:
        with MicroBatcher(tp, max_batch=4, window_ms=500) as batcher:
            outs = [t.result(60) for t in _submit_together(batcher, jobs)]
            stats = batcher.stats()
        diffs = [float(np.abs(o.images - _twin(tp, j)).max()) for o, j in zip(outs, jobs)]
    assert stats.batch_sizes == {2: 1, 1: 2}
    assert stats.mode_images == {("text-to-image", "on"): 3, ("text-to-image", "off"): 1}
    assert max(diffs) <= 1e-5, diffs
    assert float(np.abs(outs[1].images - outs[2].images).max()) > 0.01  # the scale changed the image
