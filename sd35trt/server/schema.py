"""The HTTP request body, the server's limits, and how a bad request is worded.

Types are checked strictly by pydantic (no "4" for 4, no 4.0 for an int, unknown fields refused);
the limits that depend on the server's settings and on the loaded model (size, steps, n, prompt
length) are checked in `to_job`, before anything is queued. Every refusal names the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..runtime.batching import Job
from ..runtime.config import VariantConfig
from ..runtime.errors import InvalidInputError

FIELDS = ("prompt", "negative_prompt", "size", "steps", "guidance", "seed", "n", "response_format")
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. `max_size` is further capped by the model (positional
    embedding) and by an engine set's profile; `max_n` (None: the server's max_batch) must not
    exceed the batcher's max_batch."""

    max_size: int = 2048
    max_steps: int = 100
    max_n: int | None = None
    max_prompt_chars: int = 2000
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("max_size", "max_steps", "max_n", "max_prompt_chars"):
            value = getattr(self, name)
            if name == "max_n" and value is None:
                continue
            if not (type(value) is int and value >= 1):
                raise InvalidInputError(f"{name}={value!r} must be an int >= 1")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise InvalidInputError(f"timeout_s={self.timeout_s!r} must be a number of seconds > 0")


class GenerationRequest(BaseModel):
    """POST /v1/images/generations"""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    negative_prompt: str | None = None
    size: str | None = Field(None, description="WIDTHxHEIGHT in pixels, multiples of 16; default: the model's")
    steps: int | None = Field(None, description="denoising steps; default: the model's")
    guidance: float | None = Field(None, ge=0, allow_inf_nan=False, description="CFG scale; <= 1 disables CFG")
    seed: int | None = Field(None, ge=0, lt=2**63, description="image i uses seed + i; default: random")
    n: int = Field(1, description="images; png returns one, b64_json up to the server's max")
    response_format: Literal["png", "b64_json"] = "png"


class FieldError(InvalidInputError):
    """A request field is out of the server's limits; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def parse_size(size: str, config: VariantConfig, max_size: int, min_size: int = 0) -> tuple[int, int]:
    """'WxH' -> (height, width), checked by the variant config within the server's cap."""
    m = _SIZE.match(size)
    if not m:
        raise FieldError("size", f"{size!r} must be 'WIDTHxHEIGHT' in pixels, e.g. '1024x1024'")
    width, height = int(m.group(1)), int(m.group(2))
    try:
        config.check_size(height, width, min_size=min_size, max_size=max_size)
    except InvalidInputError as exc:
        raise FieldError("size", f"{exc} (size {size!r})") from None
    return height, width


def to_job(body: GenerationRequest, limits: Limits, config: VariantConfig, seed: int,
           engine_sizes: tuple[int, int] | None = None) -> Job:
    """The batcher job for a request, or FieldError naming the first field out of limits.
    `engine_sizes`: (min, max) side of an engine set's profile, when serving one."""
    for name in ("prompt", "negative_prompt"):
        text = getattr(body, name)
        if text is not None and len(text) > limits.max_prompt_chars:
            raise FieldError(name, f"{len(text)} characters exceed the limit of {limits.max_prompt_chars}; shorten it")
    if not body.prompt.strip():
        raise FieldError("prompt", "is empty; describe the image")
    lo, hi = engine_sizes or (0, limits.max_size)
    size = body.size if body.size is not None else f"{config.default_size}x{config.default_size}"
    height, width = parse_size(size, config, min(hi, limits.max_size), lo)
    if body.steps is not None and not 1 <= body.steps <= limits.max_steps:
        raise FieldError("steps", f"{body.steps} is outside [1, {limits.max_steps}]; pick a step count in range")
    if not 1 <= body.n <= limits.max_n:
        raise FieldError("n", f"{body.n} is outside [1, {limits.max_n}] images per request")
    if body.n > 1 and body.response_format == "png":
        raise FieldError("n", f"{body.n} images need response_format 'b64_json' (a 'png' response holds one image)")
    return Job(body.prompt, body.negative_prompt, seed=seed, n=body.n, height=height, width=width,
               steps=body.steps, guidance=body.guidance, output_type="pil")


def describe_validation(errors: list[dict[str, Any]]) -> tuple[int, str | None, str]:
    """pydantic/FastAPI validation errors -> (HTTP status, field, message naming the field)."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        ctx = first.get("ctx", {}).get("error", "")
        return 400, None, f"request body is not valid JSON ({ctx}); send a JSON object with at least 'prompt'"
    if kind == "extra_forbidden":
        return 422, field, f"{field}: unknown field; the fields are {', '.join(FIELDS)}"
    if kind == "missing" and field is None:
        return 422, None, "the request needs a JSON object body with at least 'prompt'"
    if kind == "model_type" and isinstance(first.get("input"), (bytes, str)):
        return 400, None, "the body was not read as JSON; send it with 'Content-Type: application/json'"
    if kind == "model_type" or field is None:
        return 422, None, f"the body must be a JSON object with at least 'prompt' (got {type(first.get('input')).__name__})"
    return 422, field, f"{field}: {first.get('msg', 'invalid')} (got {first.get('input')!r})"
