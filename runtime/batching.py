"""Micro-batching: requests of the same shape that arrive within a short window run as one call.

    with MicroBatcher(pipe, max_batch=4, window_ms=10) as batcher:
        ticket = batcher.submit(Job("a red fox", seed=7))        # from any thread
        image = ticket.result(timeout=60).images[0]              # or: await batcher.generate(job)

Requests are grouped by everything that shapes the computation (mode: text-to-image /
image-to-image / inpainting, height, width, sampler, steps, guidance, T5 length, output type,
strength, the input image's own size and kind, skip-layer guidance settings); prompts, negative
prompts, seeds, input images, masks and LoRA strengths differ freely inside a batch.
Image i of a job draws its noise (a stochastic sampler's too) from
`torch.Generator().manual_seed(seed + i)` (`seed_generators`), one generator per image as diffusers
does for a generator list (an edit's VAE posterior too), so every image equals what
`pipe(**job.call_kwargs())` gives alone.

Threads: `workers` threads (default 1) take batches off one queue and call the pipeline. A waiting
job counts against `max_queue` (QueueFullError beyond it). Cancelling a waiting job removes it; a
running batch stops after its current step once every job in it is cancelled. A batch that runs
out of memory is run again one job at a time, so a request that fits alone is not failed by its
neighbours. `close()` refuses new jobs, runs the ones already queued and waits for the running batch.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ClosedError, GenerationCancelled, InvalidInputError, QueueFullError, is_out_of_memory
from .guidance import SkipLayerGuidance
from .images_in import source_sizes
from .pipeline import Pipeline, PipelineOutput, seed_generators
from .requests import Request


@dataclass(frozen=True)
class Job:
    """One request: `n` images of `prompt` from seeds seed, seed+1, ... (None: the variant's default).
    `image` (one PIL image / array / tensor, or a list of them dividing n) makes it image-to-image,
    `mask` too inpainting (the Pipeline's image= / mask_image=, same conventions); the
    `skip_guidance_layers` fields are the Pipeline's skip-layer guidance."""

    prompt: str
    negative_prompt: str | None = None
    seed: int = 0
    n: int = 1
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float | None = None
    max_sequence_length: int = 256
    output_type: str = "pil"
    sampler: str = "euler"
    image: Any = field(default=None, compare=False)
    mask: Any = field(default=None, compare=False)
    strength: float = 0.6
    skip_guidance_layers: tuple[int, ...] | None = None
    skip_layer_guidance_scale: float = 2.8
    skip_layer_guidance_start: float = 0.01
    skip_layer_guidance_stop: float = 0.2
    loras: tuple[tuple[str, float], ...] = ()  # (name, strength) of LoRAs loaded on the pipeline
    # ControlNet call arguments (control_image, controlnet_conditioning_scale; runtime/control.py);
    # a job with them runs in a batch of its own, its control posterior drawn from its seed.
    controls: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def skip_layer_guidance(self) -> SkipLayerGuidance | None:
        if self.skip_guidance_layers is None:
            return None
        return SkipLayerGuidance(tuple(self.skip_guidance_layers), self.skip_layer_guidance_scale,
                                 self.skip_layer_guidance_start, self.skip_layer_guidance_stop)

    def call_kwargs(self) -> dict[str, Any]:
        """The arguments of the unbatched call that gives this job's images."""
        control = {} if self.controls is None else {**self.controls,
                                                    "control_generator": torch.Generator().manual_seed(self.seed)}
        return dict(prompt=self.prompt, negative_prompt=self.negative_prompt, height=self.height,
                    width=self.width, num_inference_steps=self.steps, guidance_scale=self.guidance,
                    num_images_per_prompt=self.n, generator=seed_generators(self.seed, self.n),
                    max_sequence_length=self.max_sequence_length, output_type=self.output_type,
                    sampler=self.sampler, image=self.image, mask_image=self.mask, strength=self.strength,
                    skip_guidance_layers=self.skip_guidance_layers,
                    skip_layer_guidance_scale=self.skip_layer_guidance_scale,
                    skip_layer_guidance_start=self.skip_layer_guidance_start,
                    skip_layer_guidance_stop=self.skip_layer_guidance_stop, loras=dict(self.loras) or None,
                    **control)


@dataclass(eq=False)  # identity: two tickets of equal jobs are distinct
class Ticket:
    """A submitted job: its future (PipelineOutput with this job's images) and its cancel switch."""

    job: Job
    key: tuple
    mode: tuple[str, str] = ("text-to-image", "off")  # (mode, skip-layer guidance on|off), for the stats
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    _batcher: MicroBatcher | None = None

    def cancel(self) -> None:
        """Drop the job if it waits; stop its batch after the current step if every job in it is cancelled."""
        self.cancelled.set()
        if self._batcher is not None:
            self._batcher._forget(self)
        self.future.cancel()  # only succeeds while the job waits

    def result(self, timeout: float | None = None) -> PipelineOutput:
        return self.future.result(timeout)


@dataclass(frozen=True)
class BatcherStats:
    """Counters since start: batches run, images per batch {size: batches}, jobs by outcome,
    batches and images by (mode, skip-layer guidance "on" | "off")."""

    batches: int
    batch_sizes: dict[int, int]
    completed: int
    failed: int
    cancelled: int  # cancelled while waiting, or stopped mid-generation
    stopped_mid_run: int  # of those, jobs whose generation was stopped by the step callback
    rejected: int  # queue full
    queue_depth: int  # jobs waiting now
    running: int  # jobs in the batch(es) running now
    retried_alone: int = 0  # jobs of batches that ran out of memory, run again one by one
    mode_batches: dict[tuple[str, str], int] = field(default_factory=dict)  # {("inpainting", "off"): batches}
    mode_images: dict[tuple[str, str], int] = field(default_factory=dict)  # images of completed jobs


def check_batching(max_batch: int, window_ms: float, max_queue: int, workers: int) -> None:
    """InvalidInputError naming the first setting of a MicroBatcher that is out of range."""
    for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("workers", workers)):
        if not (type(value) is int and value >= 1):
            raise InvalidInputError(f"{name}={value!r} must be an int >= 1")
    if not (isinstance(window_ms, (int, float)) and 0 <= window_ms <= 10_000):
        raise InvalidInputError(f"window_ms={window_ms!r} must be a number of milliseconds in [0, 10000]")


class MicroBatcher:
    def __init__(self, pipe: Pipeline, max_batch: int = 4, window_ms: float = 10.0, max_queue: int = 64,
                 workers: int = 1) -> None:
        check_batching(max_batch, window_ms, max_queue, workers)
        self.pipe, self.max_batch, self.max_queue = pipe, max_batch, max_queue
        self.window = window_ms / 1000.0
        self._cond = threading.Condition()
        self._pending: deque[Ticket] = deque()
        self._closing = False
        self._counts: Counter[str] = Counter()
        self._sizes: Counter[int] = Counter()
        self._mode_batches: Counter[tuple[str, str]] = Counter()
        self._mode_images: Counter[tuple[str, str]] = Counter()
        self._running = 0
        self._threads = [threading.Thread(target=self._work, name=f"sd35trt-batcher-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    # --- submitting ---------------------------------------------------------------------------
    def submit(self, job: Job) -> Ticket:
        """Validate `job` (InvalidInputError before any work) and queue it; QueueFullError when
        `max_queue` jobs already wait, ClosedError after close()."""
        req = self.pipe.check_request(**job.call_kwargs())
        if req.batch > self.max_batch:
            raise InvalidInputError(f"n={job.n} images exceed max_batch={self.max_batch}; ask for at most "
                                    f"{self.max_batch} images per request")
        ticket = Ticket(job, batch_key(req, job), (req.mode, "off" if req.slg is None else "on"), _batcher=self)
        with self._cond:
            if self._closing:
                raise ClosedError("the micro-batcher is shutting down and takes no new jobs")
            if len(self._pending) >= self.max_queue:
                self._counts["rejected"] += 1
                raise QueueFullError(f"{len(self._pending)} requests wait (max_queue={self.max_queue}); "
                                     f"retry later or raise max_queue")
            self._pending.append(ticket)
            self._cond.notify_all()
        return ticket

    async def generate(self, job: Job) -> PipelineOutput:
        """Submit and await the job's output; cancelling the awaiting task cancels the job."""
        ticket = self.submit(job)
        try:
            return await asyncio.wrap_future(ticket.future)
        except asyncio.CancelledError:
            ticket.cancel()
            raise

    def stats(self) -> BatcherStats:
        with self._cond:
            c = self._counts
            return BatcherStats(c["batches"], dict(self._sizes), c["completed"], c["failed"], c["cancelled"],
                                c["stopped_mid_run"], c["rejected"], len(self._pending), self._running,
                                c["retried_alone"], dict(self._mode_batches), dict(self._mode_images))

    def close(self) -> None:
        """Take no new jobs, run the queued ones, wait for the workers to finish."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()

    def __enter__(self) -> MicroBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the worker side ----------------------------------------------------------------------
    def _forget(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket in self._pending:
                self._pending.remove(ticket)
                self._counts["cancelled"] += 1

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _next_batch(self) -> list[Ticket] | None:
        """Block until a batch is due: the oldest job's window has passed, its shape group fills
        max_batch, or we are closing. None when closed and drained."""
        with self._cond:
            while True:
                if not self._pending:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                first = self._pending[0]
                group = [t for t in self._pending if t.key == first.key]
                wait = first.arrived + self.window - time.monotonic()
                if sum(t.job.n for t in group) >= self.max_batch or wait <= 0 or self._closing:
                    return self._take(group)
                self._cond.wait(timeout=wait)

    def _take(self, group: list[Ticket]) -> list[Ticket]:
        batch, images = [], 0
        for t in group:  # oldest first; a job that does not fit waits for the next batch
            if images + t.job.n > self.max_batch:
                break
            self._pending.remove(t)
            if t.future.set_running_or_notify_cancel():
                batch.append(t)
                images += t.job.n
        self._running += len(batch)
        return batch

    def _run(self, batch: list[Ticket]) -> None:
        """One pipeline call for the batch. The counters are updated before any future resolves,
        so a caller that has its result also sees it counted."""
        if not batch:
            return
        results = self._call(batch)
        with self._cond:
            self._running -= len(batch)
            for r in results:
                outcome = ("stopped_mid_run" if isinstance(r, GenerationCancelled)
                           else "failed" if isinstance(r, BaseException) else "completed")
                self._counts[outcome] += 1
                self._counts["cancelled"] += outcome == "stopped_mid_run"
            for t, r in zip(batch, results):
                if not isinstance(r, BaseException):
                    self._mode_images[t.mode] += t.job.n
        for t, r in zip(batch, results):
            if isinstance(r, BaseException):
                t.future.set_exception(r)
            else:
                t.future.set_result(r)

    def _call(self, batch: list[Ticket]) -> list[PipelineOutput | BaseException]:
        """Each job's output or error. A batch of several jobs that runs out of memory is run again
        one job at a time (a smaller batch may fit), so only the jobs that fail alone fail."""
        with self._cond:
            self._counts["batches"] += 1
            self._sizes[sum(t.job.n for t in batch)] += 1
            self._mode_batches[batch[0].mode] += 1
        try:
            out = self.pipe(**_batch_kwargs(batch), callback_on_step_end=_stop_when_all_cancelled(batch),
                            progress=False)
            return _split(batch, out)
        except GenerationCancelled as exc:
            return [exc] * len(batch)
        except Exception as exc:  # the batch's jobs get the error; the batcher keeps serving
            if len(batch) > 1 and is_out_of_memory(exc):
                with self._cond:
                    self._counts["retried_alone"] += len(batch)
                return [self._call([t])[0] for t in batch]
            return [exc] * len(batch)


def batch_key(req: Request, job: Job) -> tuple:
    """What jobs must share to run as one call: the mode and everything shaping the computation
    (strength trims the schedule; the input images' own size and kind, as a list of them must
    agree; skip-layer guidance adds passes)."""
    source = None
    if job.image is not None:
        items = job.image if isinstance(job.image, (list, tuple)) else [job.image]
        source = (type(items[0]).__name__, tuple(sorted(set(source_sizes("image", job.image)))))
    return (req.mode, req.height, req.width, req.sampler.name, len(req.schedule), req.guidance,
            req.max_sequence_length, req.output_type, req.strength, source, req.slg,
            id(job) if job.controls is not None else None)  # a ControlNet job runs alone


def _per_image(value: Any, n: int) -> list:
    """A job's image (or mask) as one entry per image of the job, tiled as the Pipeline tiles a
    list that divides the batch ([a, b] -> [a, b, a, b])."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return items * (n // len(items))


def _batch_kwargs(batch: list[Ticket]) -> dict[str, Any]:
    """One call for the whole batch: one prompt, negative, generator (and input image / mask) per
    image, in job order."""
    kw = batch[0].job.call_kwargs()
    kw["prompt"] = [t.job.prompt for t in batch for _ in range(t.job.n)]
    kw["negative_prompt"] = [t.job.negative_prompt or "" for t in batch for _ in range(t.job.n)]
    kw["generator"] = [g for t in batch for g in seed_generators(t.job.seed, t.job.n)]
    kw["num_images_per_prompt"] = 1
    for name, attr in (("image", "image"), ("mask_image", "mask")):
        if kw[name] is not None:
            kw[name] = [item for t in batch for item in _per_image(getattr(t.job, attr), t.job.n)]
    if any(t.job.loras for t in batch):  # strengths per image: jobs with different LoRAs share a batch
        kw["loras"] = [dict(t.job.loras) for t in batch for _ in range(t.job.n)]
    return kw


def _stop_when_all_cancelled(batch: list[Ticket]):
    def on_step(pipe: Pipeline, i: int, t: float, kw: dict) -> dict[str, Any]:
        return {"cancel": True} if all(x.cancelled.is_set() for x in batch) else {}

    return on_step


def _split(batch: list[Ticket], out: PipelineOutput) -> list[PipelineOutput]:
    """Each job's own images (a slice of the list, array or latent tensor), in batch order."""
    outputs, start = [], 0
    for t in batch:
        images = out.images[start:start + t.job.n]
        info = {**out.info, "batch_images": len(out.images), "seeds": [t.job.seed + i for i in range(t.job.n)]}
        outputs.append(PipelineOutput(images, info))
        start += t.job.n
    return outputs
