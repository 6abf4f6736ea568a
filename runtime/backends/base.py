"""The backend interface: one callable per component, nothing else.

Shapes (B = model batch; with CFG the transformer sees 2x the image batch):
  clip_l(input_ids [B, 77] int64)  -> (penultimate hidden [B, 77, 768], pooled [B, 768])
  clip_g(input_ids [B, 77] int64)  -> (penultimate hidden [B, 77, 1280], pooled [B, 1280])
  t5(input_ids [B, T] int64)       -> hidden [B, T, 4096]            (None: T5 not loaded)
  transformer(latent [B, 16, h, w], timestep [B] in [0, 1000], context [B, 77+T, 4096],
              pooled [B, 2048])    -> velocity [B, 16, h, w] float32
  vae_decoder(latent [B, 16, h, w], already unscaled) -> image [B, 3, 8h, 8w] in [-1, 1]
  vae_encoder(image [B, 3, 8h, 8w] in [-1, 1]) -> moments [B, 32, h, w] (mean ++ log-variance,
              unscaled)            (None: not exported / not in the engine set)
A backend whose `skip_layers` is True takes `transformer(..., skip_layers=(7, 8, 9))` (skip-layer
guidance; every backend here: torch skips the blocks, exported graphs and engines take the table's
`skip_layers` input [num_layers], see `ComponentCall`); others refuse SLG before any component runs.
One whose `controlnet` is True takes `transformer(..., controlnet_residuals=[R, B, N, D])` and loads
ControlNets (`load_controlnet(folder) -> (spec, callable)`, runtime/control.py); exported graphs and
engines do so when made with `sd35trt export --controlnet` (runtime/control_graph.py), which
`check_controlnet(path, config, paths)` says before the backend loads.
Inputs arrive on `backend.device`; outputs may be any float dtype on that device. Input and output
names and order are the component table's (`runtime/components.py`). `limits` says what one call
can take beyond the model's own range; `check_request` refuses, before any component runs, a
request the backend cannot take.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from ..components import component
from ..config import VariantConfig
from ..errors import InvalidInputError

TextEncoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@runtime_checkable
class Backend(Protocol):
    name: str
    device: torch.device
    clip_l: TextEncoder
    clip_g: TextEncoder
    t5: Callable[[torch.Tensor], torch.Tensor] | None
    transformer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    vae_decoder: Callable[[torch.Tensor], torch.Tensor]
    vae_encoder: Callable[[torch.Tensor], torch.Tensor] | None
    limits: Limits
    skip_layers: bool

    def check_request(self, batch: int, height: int, width: int, max_sequence_length: int) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Limits:
    """What one call of a backend takes beyond the model's own range (None: no further limit)."""

    max_batch: int | None = None  # images per call
    min_size: int | None = None  # pixels per side
    max_size: int | None = None


class BackendBase:
    """Defaults for backends without limits of their own (torch, ONNX Runtime)."""

    limits = Limits()
    skip_layers = False  # the transformer callable takes skip_layers=
    controlnet = False  # the transformer takes controlnet_residuals= and load_controlnet(folder) exists
    vae_encoder = None

    @classmethod
    def limits_for(cls, path: Any, config: VariantConfig) -> Limits:
        """The limits a backend would have for the model at `path`, known before loading it."""
        return cls.limits

    @classmethod
    def check_controlnet(cls, path: Any, config: VariantConfig, paths: Any) -> None:
        """Refuse, before loading, ControlNets at `paths` the model at `path` cannot run (torch: any fits)."""

    def check_request(self, batch: int, height: int, width: int, max_sequence_length: int) -> None:
        """Nothing beyond the request checks every backend shares."""


def skip_vector(layers: Sequence[int] | None, num_layers: int, device: torch.device) -> torch.Tensor:
    """The per-block skip input of an exported transformer: float32 [num_layers], 1.0 = skipped."""
    flags = torch.zeros(num_layers, dtype=torch.float32)  # [L]
    if layers:
        flags[list(layers)] = 1.0
    return flags.to(device)


class ComponentCall:
    """The Backend protocol's callable for one component over `run(*inputs) -> outputs` (table
    order): a one-output component returns its tensor as float32, a multi-output one the tuple.
    `graph_layers`: for a graph with the table's per-block skip input (exported transformers,
    engines), the block count; the `skip_layers=(7, 8, 9)` option becomes that input (none: zeros).
    `residuals`: for a graph with the ControlNet residual input, latent -> the zeros it gets when a
    call brings no `controlnet_residuals=` (`zero_residuals`)."""

    def __init__(self, run: Callable[..., Sequence[torch.Tensor]], name: str, model: Any = None,
                 graph_layers: int | None = None,
                 residuals: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.run, self.name, self.n_outputs = run, name, len(component(name).outputs)
        self.model = model  # what runs it, for inspection (torch backends: the nn.Module)
        self.graph_layers, self.residuals = graph_layers, residuals

    def __call__(self, *args: torch.Tensor, **options: object) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.graph_layers is not None:
            skip = options.pop("skip_layers", None)
            args = (*args, skip_vector(skip, self.graph_layers, args[0].device))  # type: ignore[arg-type]
        if self.residuals is not None:
            res = options.pop("controlnet_residuals", None)
            args = (*args, self.residuals(args[0]) if res is None else res)  # type: ignore[arg-type]
        outs = self.run(*args, **options)  # options: the transformer's skip_layers on torch
        return outs[0].float() if self.n_outputs == 1 else tuple(outs)


def graph_layers(name: str, config: VariantConfig) -> int | None:
    """`ComponentCall`'s graph_layers for component `name` of an exported graph or engine set."""
    return config.transformer.num_layers if component(name).skips_blocks else None


def zero_residuals(residuals: int | None, config: VariantConfig,
                   broadcast: bool) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`ComponentCall`'s residuals for a transformer graph taking `residuals` ControlNet residuals
    (None: a graph without that input): zeros [R, B, h*w/p^2, D] for latent [B, 16, h, w], or,
    `broadcast`, [R, 1, 1, D], which ONNX Runtime's Add broadcasts at no cost (engine profiles fix
    the full shape: there one zero expanded to it, no memory, copied into the engine's buffer)."""
    if not residuals:
        return None
    d, p = config.transformer.inner_dim, config.transformer.patch_size

    def zeros(latent: torch.Tensor) -> torch.Tensor:
        b, _, h, w = latent.shape
        if broadcast:
            return torch.zeros(residuals, 1, 1, d, device=latent.device)  # [R, 1, 1, D]
        return torch.zeros((), device=latent.device).expand(residuals, b, (h // p) * (w // p), d)  # [R, B, N, D]

    return zeros


BackendLoader = Callable[..., Backend]
_LOADERS: dict[str, Callable[[], BackendLoader]] = {}


def register(name: str, loader: Callable[[], BackendLoader]) -> None:
    """Register a backend by name; `loader()` imports lazily and returns the factory."""
    _LOADERS[name] = loader


def available() -> list[str]:
    return sorted(_LOADERS)


def backend_class(name: str) -> BackendLoader:
    if name not in _LOADERS:
        raise InvalidInputError(f"backend={name!r} is unknown; choose one of {available()}")
    return _LOADERS[name]()


def load_backend(name: str, path: Path, config: VariantConfig, **options: Any) -> Backend:
    """Build the named backend for the model at `path` (factory signature: path, config, **options)."""
    return backend_class(name)(path, config, **options)


def backend_limits(name: str, path: Path, config: VariantConfig) -> Limits:
    """The named backend's limits for the model at `path`, without loading it."""
    return backend_class(name).limits_for(path, config)
