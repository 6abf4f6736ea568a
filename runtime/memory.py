"""Memory modes: which components keep their weights on the compute device, stage by stage.

    Pipeline.from_pretrained(path, backend="torch-fp8", calibration=..., memory="low")

A request runs in stages, CLIP-L, CLIP-G, T5, (VAE encode), transformer, VAE decode; a stage is
the components it runs (the VAE stage: encoder and decoder). Each mode is a residency plan: the
components on the compute device while a stage runs.

* `default`: everything stays on the device (nothing moves).
* `balanced`: the transformer and the VAE stay; the text encoders live in pinned host memory and
  come to the device for their stage, the next encoder's copy overlapping the current one's work
  (a side stream), and leave when denoising starts.
* `low`: one stage on the device at a time: the previous stage's weights are dropped before the
  next stage's are copied in. T5-XXL streams within its stage: its embedding and blocks one at a
  time, the next prefetched (models/streaming.py), ~0.45 GiB of its 4.4 on the device. The VAE
  decodes and encodes in tiles (models/vae_tiling.py).

`balanced` and `low` also cache prompt embeddings (a bounded LRU on the host, keyed by the
prompts and the T5 length), so a repeated request skips the text encoders. A backend takes part
through `weight_handles()` (component -> an object with load(stream)/wait()/unload()/resident()/
nbytes: torch modules in models/offload.py); modes other than `default` refuse a backend that has
none. The backend the pipeline sees is a `MemoryBackend` around the loaded one: same protocol, its
component callables enter their stage first, and `residency()` reports the measured residency at
every stage boundary (from the tensors themselves, not from bookkeeping).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch

from .components import RUNTIME
from .config import VariantConfig
from .errors import InvalidInputError
from .models.vae_tiling import DEFAULT_TILE, TiledVae, check_tile_size

MODES = ("default", "balanced", "low")
TEXT_STAGES = ("clip_l", "clip_g", "t5")
STAGES: dict[str, tuple[str, ...]] = {
    "clip_l": ("clip_l",), "clip_g": ("clip_g",), "t5": ("t5",), "transformer": ("transformer",),
    "vae": ("vae_encoder", "vae_decoder"),
}
STAGE_OF = {c: s for s, comps in STAGES.items() for c in comps}
OPTIONS = ("memory", "vae_tiling", "vae_tile_size", "prompt_cache")
DEFAULT_CACHE = 32  # prompt sets kept by balanced / low


@dataclass(frozen=True)
class MemorySettings:
    mode: str = "default"
    vae_tiling: bool = False
    vae_tile_size: int = DEFAULT_TILE
    prompt_cache: int = 0  # entries (0: off)

    @classmethod
    def pop(cls, options: dict[str, Any]) -> MemorySettings:
        """The memory options of a `from_pretrained` call, removed from `options` and checked
        (InvalidInputError before anything is loaded); unset ones take the mode's defaults."""
        settings = cls.check(**{k: options.pop(k) for k in OPTIONS if k in options})
        if settings.mode == "low" and options.get("compile") == "reduce-overhead":
            raise InvalidInputError("compile='reduce-overhead' with memory='low': CUDA graphs hold the weights' "
                                    "device addresses, which low frees after every stage; use compile=True")
        return settings

    @classmethod
    def check(cls, memory: Any = "default", vae_tiling: Any = None, vae_tile_size: Any = DEFAULT_TILE,
              prompt_cache: Any = None) -> MemorySettings:
        if memory is None:
            memory = "default"
        if not isinstance(memory, str) or memory not in MODES:
            raise InvalidInputError(f"memory={memory!r} must be one of {list(MODES)} (default: everything on the "
                                    f"GPU; balanced: text encoders off it between requests; low: one stage at a time)")
        if vae_tiling is not None and not isinstance(vae_tiling, bool):
            raise InvalidInputError(f"vae_tiling={vae_tiling!r} must be True, False or None (None: on in memory='low')")
        from .config import VaeSpec

        check_tile_size(vae_tile_size, VaeSpec())
        if prompt_cache is not None and not (type(prompt_cache) is int and prompt_cache >= 0):
            raise InvalidInputError(f"prompt_cache={prompt_cache!r} must be an int >= 0 (prompt sets cached; 0: off)")
        tiling = memory == "low" if vae_tiling is None else vae_tiling
        cache = (0 if memory == "default" else DEFAULT_CACHE) if prompt_cache is None else prompt_cache
        return cls(memory, tiling, vae_tile_size, cache)

    @property
    def moves_weights(self) -> bool:
        return self.mode != "default"

    def prepare(self, backend_cls: type, name: str, options: dict[str, Any]) -> None:
        """Before loading: refuse a backend that cannot move its weights; torch backends load on the CPU."""
        if not self.moves_weights:
            return
        if not hasattr(backend_cls, "weight_handles"):
            raise InvalidInputError(f"memory={self.mode!r}: backend {name!r} cannot move its weights between the "
                                    f"host and the device; use memory='default', or backend 'torch' / 'torch-fp8' "
                                    f"(or an engine set built with --weight-streaming)")
        if getattr(backend_cls, "stages_weights", False):
            options.setdefault("load_device", "cpu")  # each stage comes to the device when it runs


def residency_plan(mode: str, present: Sequence[str]) -> dict[str, frozenset[str]]:
    """stage -> the components on the compute device while it runs, for the components `present`."""
    have = set(present)
    keep = {"default": have, "balanced": have - set(TEXT_STAGES), "low": set()}[mode]
    stages = [s for s, comps in STAGES.items() if have & set(comps)]
    plan = {}
    for i, stage in enumerate(stages):
        want = (have & set(STAGES[stage])) | keep
        if mode == "balanced" and stage in TEXT_STAGES:
            following = [s for s in stages[i + 1:] if s in TEXT_STAGES][:1]  # prefetched during this stage
            want |= {c for s in following for c in STAGES[s] if c in have}
        plan[stage] = frozenset(want)
    return plan


class Residency:
    """Puts each stage's planned components on the device when the stage is entered (dropping the
    others first, then loading; prefetched ones on a side stream), records what is resident."""

    def __init__(self, mode: str, handles: Mapping[str, Any], device: torch.device, trace: int = 256) -> None:
        self.mode, self.handles, self.device = mode, dict(handles), torch.device(device)
        self.plan = residency_plan(mode, list(self.handles))
        self.lock = threading.RLock()
        self.trace: deque[tuple[str, frozenset[str]]] = deque(maxlen=trace)
        self._copies = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.moving = {c for c in self.handles if any(c not in p for p in self.plan.values())}
        for h in self.handles.values():  # low: T5 streams block by block (models/streaming.py)
            if hasattr(h, "streaming"):
                h.streaming = mode == "low"
        self.observers: list = []  # (stage left or None, stage entered) at every boundary, between the old
        # stage's weights leaving and the new one's arriving (bench_memory.StagePeaks)
        self._on: frozenset[str] = frozenset()
        self._stage: str | None = None
        if mode == "balanced":  # what stays between requests; low loads each stage when it comes
            self._go(self.plan.get("transformer", frozenset()), ())

    def resident(self) -> frozenset[str]:
        """The components whose weights are on the device now (measured from their tensors)."""
        return frozenset(c for c, h in self.handles.items() if h.resident())

    def weight_bytes(self, stage: str) -> int:
        """Weight bytes the plan puts on the device while `stage` runs (a streamed module: its most at once)."""
        return sum(getattr(self.handles[c], "peak_bytes", self.handles[c].nbytes) for c in self.plan[stage])

    def _go(self, want: frozenset[str], now: Sequence[str], between: Any = None) -> None:
        for c in self._on - want:
            self.handles[c].unload()
        if between is not None:  # the old stage's weights are gone, the new one's not yet copied
            between()
        for c in sorted(want - self._on, key=lambda c: c not in now):  # the stage's own first
            self.handles[c].load(None if c in now else self._copies)
        for c in now:
            self.handles[c].wait()
        self._on = want

    def _enter(self, name: str) -> None:
        """At a stage boundary (a stage other than the last call's): the plan's residency, measured and kept."""
        if name != self._stage:
            left = self._stage
            self._go(self.plan[name], [c for c in STAGES[name] if c in self.handles],
                     lambda: [observe(left, name) for observe in self.observers])
            self._stage = name
            self.trace.append((name, self.resident()))

    @contextmanager
    def stage(self, name: str, hold: bool = True) -> Iterator[None]:
        """Stage `name` resident for one component call; `hold`: other threads wait at their own stage
        until the call returns (components that never move need not hold it)."""
        with self.lock:
            self._enter(name)
            if hold:
                yield
                return
        yield


class StagedCall:
    """A component callable that enters its stage first."""

    def __init__(self, call: Any, stage: str, residency: Residency, hold: bool = True) -> None:
        self.call, self.stage, self.residency, self.hold = call, stage, residency, hold
        self.model = getattr(call, "model", None)

    def __call__(self, *args: torch.Tensor, **options: object) -> Any:
        with self.residency.stage(self.stage, self.hold):
            return self.call(*args, **options)


class MemoryBackend:
    """The Backend protocol over a loaded backend, with its memory mode's residency and tiling."""

    def __init__(self, inner: Any, settings: MemorySettings, config: VariantConfig) -> None:
        self.inner, self.settings = inner, settings
        handles = dict(inner.weight_handles()) if settings.moves_weights and hasattr(inner, "weight_handles") else {}
        if settings.moves_weights and not handles:
            raise InvalidInputError(f"memory={settings.mode!r}: backend {inner.name!r} does not hold its weights "
                                    f"on the device in a way it can move; use memory='default', or backend "
                                    f"'torch' / 'torch-fp8' (TensorRT: engines built with --weight-streaming)")
        self.residency = Residency(settings.mode, handles, inner.device)
        for c in RUNTIME:
            call = getattr(inner, c.name, None)
            if call is not None and c.name in handles:
                call = StagedCall(call, STAGE_OF[c.name], self.residency, hold=c.name in self.residency.moving)
            if call is not None and settings.vae_tiling and c.name in ("vae_decoder", "vae_encoder"):
                call = TiledVae(call, "decode" if c.name == "vae_decoder" else "encode", config.vae,
                                settings.vae_tile_size)
            setattr(self, c.name, call)

    def __getattr__(self, name: str) -> Any:  # name, device, limits, modules, attention, ...: the backend's
        return getattr(self.__dict__["inner"], name)

    def check_request(self, batch: int, height: int, width: int, max_sequence_length: int) -> None:
        self.inner.check_request(batch, height, width, max_sequence_length)

    def residency_report(self) -> list[tuple[str, frozenset[str]]]:
        """(stage, components on the device) at every stage boundary so far (the last 256)."""
        return list(self.residency.trace)

    def close(self) -> None:
        with self.residency.lock:
            for h in self.residency.handles.values():
                h.unload()  # the device copies go now, whoever still holds the modules
            self.residency.handles = {}
        for c in RUNTIME:
            setattr(self, c.name, None)
        self.inner.close()


class PromptCache:
    """A prompt encoder with a bounded LRU of its results, kept on the host: (prompts, prompts_2,
    prompts_3, T5 length) -> (context, pooled), exactly what the encoder returned."""

    def __init__(self, encode: Any, size: int) -> None:
        self.encode, self.size, self.config = encode, size, encode.config
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = self.misses = 0

    def __call__(self, prompts: Sequence[str], prompts_2: Sequence[str], prompts_3: Sequence[str],
                 max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(prompts), tuple(prompts_2), tuple(prompts_3), max_sequence_length)
        device = self.encode.backend.device
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                self.hits += 1
        if found is not None:
            return tuple(t.to(device, non_blocking=True) for t in found)  # type: ignore[return-value]
        context, pooled = self.encode(prompts, prompts_2, prompts_3, max_sequence_length)  # [B, 77+T, 4096], [B, 2048]
        with self._lock:
            self.misses += 1
            self._items[key] = (context.cpu(), pooled.cpu())
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return context, pooled


def apply_memory(pipe: Any, settings: MemorySettings) -> Any:
    """`pipe` with its backend behind `settings` (a MemoryBackend) and, when asked, a prompt cache."""
    pipe.memory = settings
    if settings == MemorySettings():
        return pipe
    pipe.backend = MemoryBackend(pipe.backend, settings, pipe.config)
    pipe.encode.backend = pipe.backend
    if settings.prompt_cache:
        pipe.encode = PromptCache(pipe.encode, settings.prompt_cache)
    return pipe


def peak_allocated(device: torch.device | str | None = None) -> int:
    """Most bytes torch has held allocated on the CUDA device since its peak was last reset (0 off CUDA)."""
    dev = torch.device(device or "cuda")
    if dev.type != "cuda" or not torch.cuda.is_available():
        return 0
    return int(torch.cuda.max_memory_allocated(dev))
