"""The ingress side of the Ray Serve app (`sd35trt.server.ray`): a `ModelHost` twin whose pipeline
lives in model replicas, so `create_app` serves the same routes, schema, errors and metrics over it.

`RemoteHost.require_ready()` gives what the generation route reads from a local host: a description
of the model (`RemoteModel`: config, backend name and limits, so the request is checked here,
before it is sent) and a batcher whose `submit(job)` sends the job to a replica (`RemoteBatcher`).
When that replica dies mid-request the job is sent again, as it is (its seed was fixed by the
route, so the image is the same), and the router avoids the dead replica; no ready replica is
`NotReadyError` (503). Counters in /metrics are the sums of what each replica reported with its
last answer; the queue and running gauges are those replicas' as of their last answers, and are
dropped when a replica dies (they come back with the next answers).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..runtime import PipelineOutput
from ..runtime.backends import Limits as BackendLimits
from ..runtime.batching import BatcherStats, Job
from ..runtime.config import VariantConfig
from ..runtime.errors import QueueFullError

from .app import ClientGone
from .state import NotReadyError, ServeSettings

log = logging.getLogger(__name__)
MODEL = "Model"  # the model deployment's name in the app
RETRIES = 4  # a request is sent again at most this many times when its replica dies
POLL_S = 1.0  # how often the ingress asks the controller how many replicas run


@dataclass(frozen=True)
class BackendInfo:
    name: str
    limits: BackendLimits


@dataclass(frozen=True)
class RemoteModel:
    """What the ingress knows of the replicas' pipeline: the attributes the routes read from one."""

    config: VariantConfig
    backend: BackendInfo
    max_batch: int
    loras: tuple[str, ...] = ()  # the LoRAs every replica loaded from --lora-dir (server/loras.py)
    lora_details: tuple[dict, ...] = ()

    def lora_info(self) -> list[dict]:
        return list(self.lora_details)


def _rebuild(cls: type, args: tuple, state: dict) -> BaseException:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


@dataclass
class Reply:
    """A replica's answer: the output or the (typed) error, its batcher's counters, its id."""

    output: PipelineOutput | None
    error: BaseException | None
    stats: BatcherStats
    replica: str

    def __reduce__(self):
        # The error travels as class + args + attributes: exceptions whose __init__ takes other
        # arguments than their message (NonFiniteLatentsError) do not unpickle by default.
        error = None if self.error is None else (type(self.error), self.error.args, dict(self.error.__dict__))
        return _reply, (self.output, error, self.stats, self.replica)


def _reply(output: PipelineOutput | None, error: tuple | None, stats: BatcherStats, replica: str) -> Reply:
    return Reply(output, None if error is None else _rebuild(*error), stats, replica)


def _is_replica_death(exc: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError)


def _is_cancellation(exc: BaseException) -> bool:
    from ray.serve.exceptions import RequestCancelledError

    return isinstance(exc, (asyncio.CancelledError, RequestCancelledError))


def _is_back_pressure(exc: BaseException) -> bool:
    from ray.serve.exceptions import BackPressureError

    return isinstance(exc, BackPressureError)


@dataclass(eq=False)
class RemoteTicket:
    """`Ticket`'s interface (future, cancel) over a request sent to the replicas."""

    job: Job
    future: Future = field(default_factory=Future)
    task: asyncio.Task | None = None

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()  # cancels the replica's request, which cancels its job there
        self.future.cancel()


class RemoteBatcher:
    """Sends jobs to the model deployment through its handle; retries on a replica's death."""

    def __init__(self, host: RemoteHost) -> None:
        self.host = host

    def submit(self, job: Job) -> RemoteTicket:
        ticket = RemoteTicket(job)
        ticket.task = asyncio.get_running_loop().create_task(self._run(ticket))
        return ticket

    async def _run(self, ticket: RemoteTicket) -> None:
        try:
            reply = await self._send(ticket.job)
        except BaseException as exc:
            if not ticket.future.done():
                # Cancelled, and not by the ticket: Serve cancels the requests a request made when its
                # client goes away (the proxy's 499), so this one is answered as the client's leaving.
                ticket.future.set_exception(ClientGone() if _is_cancellation(exc) else exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.host.record(reply.replica, reply.stats)
        if ticket.future.done():
            return
        if reply.error is not None:
            ticket.future.set_exception(reply.error)
        else:
            ticket.future.set_result(reply.output)

    async def _send(self, job: Job) -> Reply:
        for attempt in range(RETRIES + 1):
            response = self.host.handle.generate.remote(job)
            try:
                return await response
            except asyncio.CancelledError:
                response.cancel()
                raise
            except Exception as exc:
                if _is_cancellation(exc):
                    raise
                if _is_back_pressure(exc):
                    raise QueueFullError(f"the model replicas' queues are full ({exc}); retry later, or add "
                                         f"replicas / raise --max-queue") from None
                if not _is_replica_death(exc) or attempt == RETRIES:
                    raise
                self.host.replica_died()
                log.warning("a model replica died while generating (seed %d); sending the request to another "
                            "(retry %d of %d)", job.seed, attempt + 1, RETRIES)
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
        raise AssertionError("unreachable")


class RemoteHost:
    """`ModelHost`'s interface for `create_app`, over the model deployment `handle` of app `app_name`.

    `replicas()` says how many model replicas run now (the controller's count; polled every
    POLL_S on a thread, from `start()` to `close()`); the model's description is asked of a replica
    once one runs."""

    def __init__(self, settings: ServeSettings, handle: Any, replicas: Callable[[], tuple[int, str]]) -> None:
        self.settings, self.handle, self._replicas = settings, handle, replicas
        self.status, self.error = "loading", None
        self.pipe: RemoteModel | None = None
        self.batcher = RemoteBatcher(self)
        self.created = int(time.time())
        self.running, self.note = 0, "no model replica has started yet"
        self.retries = 0
        self._stats: dict[str, BatcherStats] = {}
        self._live: set[str] = set()  # replicas whose gauges count (reported since the last death)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # --- the controller's view, polled -----------------------------------------------------------
    def start(self) -> None:
        self._watcher = threading.Thread(target=self._watch, name="sd35trt-replicas", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                running, note = self._replicas()
                if running and self.pipe is None:
                    self.pipe = self.handle.info.remote().result(timeout_s=30)
            except Exception as exc:  # the controller or a replica did not answer: not ready for now
                running, note = 0, f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.running, self.note = running, note
                if self.status in ("loading", "ready"):
                    self.status = "ready" if running and self.pipe is not None else "loading"
            self._stop.wait(POLL_S)

    # --- what create_app reads ---------------------------------------------------------------------
    @property
    def model_id(self) -> str | None:
        if self.settings.model_id:
            return self.settings.model_id
        return self.pipe.config.name if self.pipe is not None else None

    @property
    def config(self) -> VariantConfig | None:
        return self.pipe.config if self.pipe is not None else None

    def model_names(self) -> frozenset[str]:
        from .state import ModelHost

        return ModelHost.model_names(self)  # type: ignore[arg-type]  # same names as a local host

    def require_ready(self) -> tuple[RemoteModel, RemoteBatcher]:
        with self._lock:
            if self.status == "ready" and self.pipe is not None:
                return self.pipe, self.batcher
            raise NotReadyError(self.describe())

    def describe(self) -> str:
        if self.status in ("draining", "stopped"):
            return "the server is shutting down and takes no new requests"
        if self.status == "ready":
            return "ready"
        return (f"no model replica of {self.settings.model} is ready ({self.note}); retry shortly, or read the "
                f"replicas' logs if it lasts")

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def max_batch(self) -> int:
        return self.pipe.max_batch if self.pipe is not None else self.settings.max_batch

    # --- the replicas' counters ------------------------------------------------------------------
    def record(self, replica: str, stats: BatcherStats) -> None:
        with self._lock:
            self._stats[replica] = stats
            self._live.add(replica)

    def replica_died(self) -> None:
        with self._lock:
            self.retries += 1
            self._live.clear()

    def stats(self) -> BatcherStats | None:
        """The replicas' counters summed (every replica that ever answered) and their gauges (those
        that answered since the last death)."""
        with self._lock:
            snaps, live = dict(self._stats), set(self._live)
        if not snaps:
            return None
        total: Counter[str] = Counter()
        sizes: Counter[int] = Counter()
        for name, s in snaps.items():
            for f in ("batches", "completed", "failed", "cancelled", "stopped_mid_run", "rejected", "retried_alone"):
                total[f] += getattr(s, f)
            if name in live:
                total["queue_depth"] += s.queue_depth
                total["running"] += s.running
            sizes.update(s.batch_sizes)
        return BatcherStats(total["batches"], dict(sizes), total["completed"], total["failed"], total["cancelled"],
                            total["stopped_mid_run"], total["rejected"], total["queue_depth"], total["running"],
                            total["retried_alone"])

    # --- life --------------------------------------------------------------------------------------
    def begin_drain(self) -> None:
        with self._lock:
            if self.status in ("loading", "ready"):
                self.status = "draining"

    def close(self) -> None:
        self.begin_drain()
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        with self._lock:
            self.status = "stopped"


class RetryMetrics:
    """/metrics: requests sent again to another replica because theirs died (Ray app only)."""

    def __init__(self, host: RemoteHost) -> None:
        self.host = host

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily("sd35trt_replica_retries", "requests sent again to another model replica after "
                                  "theirs died mid-request", value=self.host.retries)
