"""Runtime: tokenizers, text encoders, the flow-matching Euler loop with CFG, VAE decode.

    from sd35trt.runtime import Pipeline
    pipe = Pipeline.from_pretrained("path/to/sd3.5", backend="torch")
    image = pipe("a red fox in snow", generator=torch.Generator().manual_seed(0)).images[0]
"""

from .batching import Job, MicroBatcher
from .config import VARIANTS, VariantConfig
from .errors import (
    BackendError,
    CheckpointError,
    ClosedError,
    GenerationCancelled,
    InvalidInputError,
    NonFiniteImageError,
    NonFiniteLatentsError,
    OutOfMemoryError,
    QueueFullError,
    Sd35Error,
)
from .pipeline import Pipeline, PipelineOutput, seed_generators
from .schedule import Schedule, flow_match_schedule

__all__ = [
    "VARIANTS", "VariantConfig", "Pipeline", "PipelineOutput", "seed_generators", "MicroBatcher", "Job",
    "Schedule", "flow_match_schedule", "Sd35Error", "InvalidInputError", "CheckpointError",
    "NonFiniteLatentsError", "NonFiniteImageError", "GenerationCancelled", "BackendError", "OutOfMemoryError", "QueueFullError",
    "ClosedError",
]
