"""How the Ray Serve app scales (`Scaling`), and a `serve` config's `args:` read into the settings;
no Ray import here, so the command line checks its flags before it imports Ray."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from ..runtime.errors import InvalidInputError

from .schema import Limits
from .state import ServeSettings


@dataclass(frozen=True)
class Scaling:
    """How many model replicas and what each holds. `autoscale`: (min, max) replicas, scaled on
    `target_queue` ongoing requests per replica (default: the batch size); otherwise `replicas`.
    `gpus_per_replica` None: 1 when this machine has CUDA, else 0 (CPU replicas share the cores)."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    target_queue: float | None = None
    gpus_per_replica: float | None = None
    cpus_per_replica: float = 1.0

    def __post_init__(self) -> None:
        if not (type(self.replicas) is int and self.replicas >= 1):
            raise InvalidInputError(f"replicas={self.replicas!r} must be an int >= 1")
        if self.autoscale is not None:
            lo, hi = self.autoscale
            if not (type(lo) is int and type(hi) is int and 0 <= lo <= hi and hi >= 1):
                raise InvalidInputError(f"autoscale={self.autoscale!r} must be MIN-MAX replicas with "
                                        f"0 <= MIN <= MAX and MAX >= 1, e.g. 1-4")
        for name in ("target_queue", "gpus_per_replica"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value >= 0):
                raise InvalidInputError(f"{name}={value!r} must be a number >= 0")
        if self.target_queue is not None and self.target_queue <= 0:
            raise InvalidInputError(f"target_queue={self.target_queue!r} must be > 0 requests per replica")


_SETTINGS = {f.name for f in fields(ServeSettings)} - {"limits"}
_LIMITS = {f.name for f in fields(Limits)}
_SCALING = {f.name for f in fields(Scaling)}


def settings_from_args(args: Mapping[str, Any]) -> tuple[ServeSettings, Scaling]:
    """A `serve` config's `args:` -> (ServeSettings, Scaling); InvalidInputError naming an unknown key."""
    unknown = sorted(set(args) - _SETTINGS - _LIMITS - _SCALING)
    if unknown:
        raise InvalidInputError(f"unknown argument(s) {', '.join(unknown)} for sd35trt.server.ray:build_app; "
                                f"use {', '.join(sorted(_SETTINGS | _LIMITS | _SCALING))}")
    if "model" not in args:
        raise InvalidInputError("build_app needs args.model: a model folder, file or engine set (as `sd35trt serve --model`)")
    own = {k: v for k, v in args.items() if k in _SETTINGS}
    own["model"] = Path(own["model"])
    own["model_aliases"] = tuple(own.get("model_aliases", ()))
    scale = {k: v for k, v in args.items() if k in _SCALING}
    if isinstance(scale.get("autoscale"), str):
        scale["autoscale"] = parse_autoscale(scale["autoscale"])
    limits = Limits(**{k: v for k, v in args.items() if k in _LIMITS})
    return ServeSettings(**own, limits=limits), Scaling(**scale)


def parse_autoscale(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not (sep and lo.strip().isdigit() and hi.strip().isdigit()):
        raise InvalidInputError(f"autoscale {text!r} must be MIN-MAX replicas, e.g. 1-4")
    return int(lo), int(hi)
