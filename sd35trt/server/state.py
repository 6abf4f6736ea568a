"""What the server serves: its settings, and the model's life (loading, ready, failed, draining).

The model loads on a background thread when the app starts, so /healthz answers at once and
/readyz says 503 "loading" until the pipeline and its micro-batcher are up, or 503 with the load
error (a corrupt or foreign engine, a missing component) for as long as the process lives.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from ..runtime import Pipeline
from ..runtime.backends import Limits as BackendLimits
from ..runtime.backends import backend_limits
from ..runtime.batching import BatcherStats, MicroBatcher, check_batching
from ..runtime.checkpoint import Checkpoint
from ..runtime.errors import ClosedError, InvalidInputError

from .loras import LoraLimits, load_lora_dir
from .schema import Limits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    """`model`: a diffusers folder, single file, `sd35trt export` folder or engine set (`sd35trt
    build`); the backend defaults to what it holds (torch, onnxruntime, the set's flavor), and the
    backend's limits (an engine set's profile) cap the batch and the sizes. `engines=True` insists
    on an engine set. `model_id` is the name `GET /v1/models` lists and requests may pass as
    `model` (default: the variant's name, e.g. sd3.5-large); `model_aliases` are further names
    accepted for it (the variant and folder names and OpenAI's image model names always are)."""

    model: Path
    backend: str | None = None  # default: what the model path holds (Checkpoint.default_backend)
    engines: bool = False
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    max_batch: int = 4
    batch_window_ms: float = 10.0
    max_queue: int = 64
    workers: int = 1
    limits: Limits = field(default_factory=Limits)
    model_id: str | None = None
    model_aliases: tuple[str, ...] = ()
    lora_dir: Path | None = None  # every *.safetensors in it is loaded (server/loras.py)
    lora_limits: LoraLimits = field(default_factory=LoraLimits)
    controlnets: tuple[tuple[str, str], ...] = ()  # (name, ControlNet folder), loaded at start (server/control.py)

    @property
    def controlnet_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.controlnets)

    def __post_init__(self) -> None:
        check_batching(self.max_batch, self.batch_window_ms, self.max_queue, self.workers)
        names = self.controlnet_names
        if len(set(names)) != len(names) or not all(n and isinstance(n, str) for n in names):
            raise InvalidInputError(f"controlnets={names!r}: give each ControlNet a distinct, non-empty name")
        if self.limits.max_n is None:
            object.__setattr__(self, "limits", replace(self.limits, max_n=self.max_batch))
        if self.limits.max_n > self.max_batch:
            raise InvalidInputError(f"limits.max_n={self.limits.max_n} exceeds max_batch={self.max_batch}; "
                                    f"a request's images run in one batch, so lower max_n or raise max_batch")


class NotReadyError(ClosedError):
    """The model is loading, failed to load, or the server is shutting down."""


class ModelHost:
    """Owns the pipeline (unless one was handed in) and the micro-batcher; thread-safe."""

    def __init__(self, settings: ServeSettings, pipeline: Pipeline | None = None) -> None:
        self.settings = settings
        self.status, self.error = "loading", None
        self.pipe: Pipeline | None = None
        self.batcher: MicroBatcher | None = None
        self.caps: BackendLimits | None = None  # the backend's, asked before loading
        self.config = pipeline.config if pipeline is not None else None  # known once the model path is read
        self.created = int(time.time())
        # Called (on the loading thread) when the model fails to load; `sd35trt serve` stops the
        # server with it. Unset (embedded servers): /readyz reports the failure for as long as the process lives.
        self.on_failure: Callable[[], None] | None = None
        self._given = pipeline
        self._lock = threading.Lock()
        self._loader: threading.Thread | None = None

    def start(self) -> None:
        if self._given is not None:
            self._ready(self._given)
            return
        self._loader = threading.Thread(target=self._load, name="sd35trt-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        s = self.settings
        try:
            ckpt = Checkpoint.open(s.model)
            self.config = ckpt.config
            if s.engines and ckpt.default_backend not in ("tensorrt", "tensorrt-rtx"):
                raise InvalidInputError(f"{s.model} is not an engine set (no engine manifest); serve it with "
                                        f"--model, or build one with `sd35trt build`")
            backend = s.backend or ckpt.default_backend
            self.caps = backend_limits(backend, ckpt, ckpt.config)
            nets = {"controlnet": [str(p) for _, p in s.controlnets]} if s.controlnets else {}
            self._ready(Pipeline.from_pretrained(s.model, backend=backend, **dict(s.backend_options), **nets))
        except Exception as exc:  # any load failure is reported by /readyz, the process keeps serving
            with self._lock:
                self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
            if self.on_failure is not None:
                self.on_failure()  # whoever asked to stop reports the error
            else:
                log.error("model %s failed to load: %s", s.model, exc)

    def _ready(self, pipe: Pipeline) -> None:
        s = self.settings
        if s.lora_dir is not None:
            load_lora_dir(pipe, s.lora_dir)
        caps = self.caps or pipe.backend.limits
        max_batch = min(s.max_batch, caps.max_batch) if caps.max_batch else s.max_batch
        batcher = MicroBatcher(pipe, max_batch=max_batch, window_ms=s.batch_window_ms, max_queue=s.max_queue,
                               workers=s.workers)
        with self._lock:
            self.pipe, self.batcher = pipe, batcher
            if self.status == "loading":
                self.status = "ready"

    @property
    def model_id(self) -> str | None:
        """The served model's id (None until the model path has been read)."""
        if self.settings.model_id:
            return self.settings.model_id
        return self.config.name if self.config is not None else None

    def model_names(self) -> frozenset[str]:
        """Names a request's `model` may use for the served model."""
        names = {self.settings.model_id, *self.settings.model_aliases, Path(self.settings.model).name,
                 Path(self.settings.model).stem}
        if self.config is not None:
            names.add(self.config.name)
        return frozenset(n for n in names if n)

    def require_ready(self) -> tuple[Pipeline, MicroBatcher]:
        with self._lock:
            if self.status == "ready" and self.pipe is not None and self.batcher is not None:
                return self.pipe, self.batcher
            raise NotReadyError(self.describe())

    def describe(self) -> str:
        if self.status == "failed":
            return f"model {self.settings.model} failed to load: {self.error}; fix it and restart the server"
        if self.status == "loading":
            return f"model {self.settings.model} is still loading; retry shortly"
        if self.status in ("draining", "stopped"):
            return "the server is shutting down and takes no new requests"
        return "ready"

    def stats(self) -> BatcherStats | None:
        batcher = self.batcher
        return batcher.stats() if batcher is not None else None

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def max_batch(self) -> int:
        return self.batcher.max_batch if self.batcher is not None else self.settings.max_batch

    def begin_drain(self) -> None:
        """Stop taking requests (readyz 503); those already queued or running still finish."""
        with self._lock:
            if self.status in ("loading", "ready"):
                self.status = "draining"

    def close(self) -> None:
        """Drain: finish queued and running jobs, then free the pipeline if we loaded it."""
        self.begin_drain()
        if self._loader is not None:
            self._loader.join()
        if self.batcher is not None:
            self.batcher.close()
        if self.pipe is not None and self._given is None:
            self.pipe.close()
        with self._lock:
            if self.status != "failed":
                self.status = "stopped"
