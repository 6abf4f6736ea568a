"""The backend interface: one callable per component, nothing else.

Shapes (B = model batch; with CFG the transformer sees 2x the image batch):
  clip_l(input_ids [B, 77] int64)  -> (penultimate hidden [B, 77, 768], pooled [B, 768])
  clip_g(input_ids [B, 77] int64)  -> (penultimate hidden [B, 77, 1280], pooled [B, 1280])
  t5(input_ids [B, T] int64)       -> hidden [B, T, 4096]            (None: T5 not loaded)
  transformer(latent [B, 16, h, w], timestep [B] in [0, 1000], context [B, 77+T, 4096],
              pooled [B, 2048])    -> velocity [B, 16, h, w] float32
  vae_decoder(latent [B, 16, h, w], already unscaled) -> image [B, 3, 8h, 8w] in [-1, 1]
Inputs arrive on `backend.device`; outputs may be any float dtype on that device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch

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

    def close(self) -> None: ...


BackendLoader = Callable[..., Backend]
_LOADERS: dict[str, Callable[[], BackendLoader]] = {}


def register(name: str, loader: Callable[[], BackendLoader]) -> None:
    """Register a backend by name; `loader()` imports lazily and returns the factory."""
    _LOADERS[name] = loader


def available() -> list[str]:
    return sorted(_LOADERS)


def load_backend(name: str, path: Path, config: VariantConfig, **options: Any) -> Backend:
    """Build the named backend for the model at `path` (factory signature: path, config, **options)."""
    if name not in _LOADERS:
        raise InvalidInputError(f"backend={name!r} is unknown; choose one of {available()}")
    return _LOADERS[name]()(path, config, **options)
