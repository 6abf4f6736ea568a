"""Skip-layer guidance fields of a request (generations and edits), checked before anything is
queued: each refusal is a FieldError naming the field and the fix. Whether the backend can skip
blocks is the Pipeline's own check (its refusal names skip_guidance_layers, server/fields.py)."""

from __future__ import annotations

from typing import Any

from ..runtime.config import VariantConfig

from .fields import FieldError

SLG_OPTIONS = ("skip_layer_guidance_scale", "skip_layer_guidance_start", "skip_layer_guidance_stop")


def skip_layer_fields(body: Any, config: VariantConfig) -> dict[str, Any]:
    """The Job fields of the request's skip-layer guidance ({} when it asks for none)."""
    layers = body.skip_guidance_layers
    if layers is None:
        for name in SLG_OPTIONS:
            if getattr(body, name) is not None:
                raise FieldError(name, "applies only with skip_guidance_layers; add skip_guidance_layers "
                                       "(SD3.5 Medium: [7, 8, 9]) or leave it out")
        return {}
    blocks = config.transformer.num_layers
    if not layers:
        raise FieldError("skip_guidance_layers", "is empty; pass the blocks to skip (e.g. [7, 8, 9]) or leave it out")
    bad = [k for k in layers if not 0 <= k < blocks]
    if bad:
        raise FieldError("skip_guidance_layers", f"{bad} outside [0, {blocks - 1}]: {config.name} has {blocks} "
                                                 f"transformer blocks (SD3.5 Medium uses [7, 8, 9])")
    guidance = config.sampling.guidance if body.guidance is None else body.guidance
    if guidance <= 1.0:
        raise FieldError("skip_guidance_layers", f"needs classifier-free guidance, but guidance is {guidance:g}; "
                                                 f"pass guidance > 1 or leave skip_guidance_layers out")
    out: dict[str, Any] = {"skip_guidance_layers": tuple(layers)}
    for name in SLG_OPTIONS:
        if getattr(body, name) is not None:
            out[name] = float(getattr(body, name))
    start, stop = out.get("skip_layer_guidance_start", 0.01), out.get("skip_layer_guidance_stop", 0.2)
    if not start < stop:
        raise FieldError("skip_layer_guidance_start", f"{start:g} is not below skip_layer_guidance_stop {stop:g}; "
                                                      f"the window is [start, stop) in fractions of the steps")
    return out
