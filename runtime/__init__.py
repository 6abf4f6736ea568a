"""Runtime: tokenizers, text encoders, the flow-matching Euler loop with CFG, VAE decode.

    from sd35trt.runtime import Pipeline
    pipe = Pipeline.from_pretrained("path/to/sd3.5", backend="torch")
    image = pipe("a red fox in snow", generator=torch.Generator().manual_seed(0)).images[0]
"""

from .config import VARIANTS, VariantConfig
from .errors import (
    CheckpointError,
    GenerationCancelled,
    InvalidInputError,
    NonFiniteLatentsError,
    Sd35Error,
)
from .pipeline import Pipeline, PipelineOutput
from .schedule import Schedule, flow_match_schedule

__all__ = [
    "VARIANTS", "VariantConfig", "Pipeline", "PipelineOutput", "Schedule", "flow_match_schedule",
    "Sd35Error", "InvalidInputError", "CheckpointError", "NonFiniteLatentsError", "GenerationCancelled",
]
