"""Runtime: tokenizers, text encoders, the flow-matching Euler loop with CFG, VAE decode.

    from sd35trt.runtime import Pipeline
    pipe = Pipeline.from_pretrained("path/to/sd3.5", backend="torch")
    image = pipe("a red fox in snow", generator=torch.Generator().manual_seed(0)).images[0]

The names below are imported on first use (PEP 562), so `import sd35trt.runtime.config` or
`.errors` does not pull in torch: the command line checks its flags against a model's config
before paying for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    ".batching": ("Job", "MicroBatcher"),
    ".config": ("VARIANTS", "VariantConfig"),
    ".errors": ("BackendError", "CheckpointError", "ClosedError", "GenerationCancelled", "InvalidInputError",
                "NonFiniteImageError", "NonFiniteLatentsError", "OutOfMemoryError", "QueueFullError", "Sd35Error"),
    ".pipeline": ("Pipeline", "PipelineOutput", "seed_generators"),
    ".schedule": ("Schedule", "flow_match_schedule"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "VARIANTS", "VariantConfig", "Pipeline", "PipelineOutput", "seed_generators", "MicroBatcher", "Job",
    "Schedule", "flow_match_schedule", "Sd35Error", "InvalidInputError", "CheckpointError",
    "NonFiniteLatentsError", "NonFiniteImageError", "GenerationCancelled", "BackendError", "OutOfMemoryError", "QueueFullError",
    "ClosedError",
]

if TYPE_CHECKING:
    from .batching import Job, MicroBatcher
    from .config import VARIANTS, VariantConfig
    from .errors import (BackendError, CheckpointError, ClosedError, GenerationCancelled, InvalidInputError,
                         NonFiniteImageError, NonFiniteLatentsError, OutOfMemoryError, QueueFullError, Sd35Error)
    from .pipeline import Pipeline, PipelineOutput, seed_generators
    from .schedule import Schedule, flow_match_schedule


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    try:  # a submodule: `sd35trt.runtime.batching` after `import sd35trt.runtime`
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
