"""The HTTP request body (OpenAI's Images API plus our own fields), the server's limits, and how a
bad request is worded.

Types are checked strictly by pydantic (no "4" for 4, no 4.0 for an int, unknown fields refused);
the limits that depend on the server's settings and on the loaded model (size, steps, n, prompt
length, the model name) are checked in `to_job`, before anything is queued. Every refusal is a 400
`invalid_request_error` naming the field (`param`) with a `code`, as OpenAI's API answers, so the
official clients raise `BadRequestError`.

OpenAI fields and what they do here:
  model            the served model's id or an alias (`ServeSettings.model_aliases`, the variant and
                   folder names, OpenAI's image model names); anything else is refused
  n, size          as OpenAI ("auto" = the model's default size); size is "WIDTHxHEIGHT", multiples of 16
  response_format  "b64_json" (default); "url" is refused (no images are stored); our "png" = raw bytes
  output_format    png (default) | jpeg | webp; output_compression 0-100 is the JPEG/WebP quality
  background       "auto" | "opaque" accepted (SD3.5 makes opaque images); "transparent" refused
  quality, style, moderation, complexity, user, safety_identifier   accepted and ignored
  stream, partial_images, frame_count, frame_duration_ms, svg       refused unless off / unset
Our own: negative_prompt, steps, guidance, seed, sampler, and skip-layer guidance
(skip_guidance_layers, skip_layer_guidance_scale / _start / _stop: the Pipeline's arguments; checked
in server/modes.py); loras ([{name, scale}], server/loras.py). POST /v1/images/edits takes the same fields as a multipart form (server/edits.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..runtime.batching import Job
from ..runtime.config import VariantConfig
from ..runtime.errors import InvalidInputError
from ..runtime.samplers import SAMPLER_NAMES
from .loras import LoraRef
from .control import control_fields

from .fields import FieldError
from .modes import skip_layer_fields

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
# Model names stock OpenAI code sends; accepted as aliases of the served model.
OPENAI_MODEL_PREFIXES = ("dall-e-", "gpt-image-", "chatgpt-image-")


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
    max_image_bytes: int = 16 * 2**20  # an edit's image or mask file
    max_image_pixels: int = 4096 * 4096  # an edit's image or mask, before it is resized to `size`

    def __post_init__(self) -> None:
        for name in ("max_size", "max_steps", "max_n", "max_prompt_chars", "max_image_bytes", "max_image_pixels"):
            value = getattr(self, name)
            if name == "max_n" and value is None:
                continue
            if not (type(value) is int and value >= 1):
                raise InvalidInputError(f"{name}={value!r} must be an int >= 1")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise InvalidInputError(f"timeout_s={self.timeout_s!r} must be a number of seconds > 0")


class GenerationRequest(BaseModel):
    """POST /v1/images/generations"""

    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())

    prompt: str
    model: str | None = Field(None, description="the served model's id or an alias; default: the served model")
    n: int | None = Field(1, description="images; a raw-image response holds one")
    size: str | None = Field(None, description="'WIDTHxHEIGHT' (multiples of 16) or 'auto'; default: the model's")
    response_format: Literal["b64_json", "url", "png"] | None = Field(
        None, description="b64_json (default); png: the raw image (as Accept: image/png)")
    output_format: Literal["png", "jpeg", "webp", "gif", "svg"] | None = None
    output_compression: int | None = Field(None, ge=0, le=100, description="JPEG/WebP quality")
    background: Literal["transparent", "opaque", "auto"] | None = None
    quality: str | None = Field(None, description="accepted and ignored (use steps)")
    style: str | None = Field(None, description="accepted and ignored")
    moderation: str | None = Field(None, description="accepted and ignored")
    complexity: str | None = Field(None, description="accepted and ignored")
    user: str | None = Field(None, description="accepted and ignored")
    safety_identifier: str | None = Field(None, description="accepted and ignored")
    stream: bool | None = None
    partial_images: int | None = None
    frame_count: int | None = None
    frame_duration_ms: int | None = None
    svg: dict[str, Any] | None = None
    # our own
    negative_prompt: str | None = None
    steps: int | None = Field(None, description="denoising steps; default: the model's")
    guidance: float | None = Field(None, ge=0, allow_inf_nan=False, description="CFG scale; <= 1 disables CFG")
    seed: int | None = Field(None, ge=0, lt=2**63, description="image i uses seed + i; default: random")
    sampler: str | None = Field(None, description="euler (default), dpmpp_2m, dpmpp_2m_sde, heun")
    skip_guidance_layers: list[int] | None = Field(None, description="skip-layer guidance: blocks skipped in a "
                                                   "third pass (SD3.5 Medium: [7, 8, 9]); needs guidance > 1")
    skip_layer_guidance_scale: float | None = Field(None, ge=0, allow_inf_nan=False, description="default 2.8")
    skip_layer_guidance_start: float | None = Field(None, ge=0, le=1, description="fraction of the steps; default 0.01")
    skip_layer_guidance_stop: float | None = Field(None, ge=0, le=1, description="fraction of the steps; default 0.2")
    loras: list[LoraRef] | None = Field(None, description="[{name, scale}] of LoRAs listed by GET /v1/loras")
    control_image: str | None = Field(None, description="ControlNet image, base64 PNG/JPEG/WebP (server/control.py)")
    control_type: str | None = Field(None, description="canny | blur preprocessing; default: the image as given")
    control_scale: float | None = Field(None, ge=0, allow_inf_nan=False, description="ControlNet scale; default 1.0")
    controlnet: str | None = Field(None, description="which served ControlNet; default: the only one")


FIELDS = tuple(GenerationRequest.model_fields)


@dataclass(frozen=True)
class Rendering:
    """How the answer is shaped: raw image bytes or JSON with base64 images, in which format."""

    raw: bool
    fmt: str  # png | jpeg | webp
    quality: int | None  # JPEG/WebP


def parse_size(size: str, config: VariantConfig, max_size: int, min_size: int = 0) -> tuple[int, int]:
    """'WxH' -> (height, width), checked by the variant config within the server's cap."""
    m = _SIZE.match(size)
    if not m:
        raise FieldError("size", f"{size!r} must be 'WIDTHxHEIGHT' in pixels (e.g. '1024x1024') or 'auto'")
    width, height = int(m.group(1)), int(m.group(2))
    try:
        config.check_size(height, width, min_size=min_size, max_size=max_size)
    except InvalidInputError as exc:
        raise FieldError("size", f"{exc} (size {size!r})") from None
    return height, width


def check_model(name: str | None, served: str, aliases: frozenset[str]) -> None:
    if name is None or name in aliases or name.startswith(OPENAI_MODEL_PREFIXES):
        return
    raise FieldError("model", f"{name!r} is not served here; this server serves {served!r} (also accepted: "
                              f"{', '.join(sorted(aliases - {served})) or 'none'}, and OpenAI's image model names); "
                              f"pass model={served!r} or leave it out", code="model_not_found")


def _unsupported(body: GenerationRequest) -> None:
    """Refuse OpenAI options this server cannot honour (each names its field and what works)."""
    if body.response_format == "url":
        raise FieldError("response_format", "'url' is not supported: this server stores no images; use 'b64_json' "
                                            "(the default), or Accept: image/png for the raw image", "unsupported_value")
    if body.output_format in ("gif", "svg"):
        raise FieldError("output_format", f"{body.output_format!r} is not supported; use one of {OUTPUT_FORMATS}",
                         "unsupported_value")
    if body.background == "transparent":
        raise FieldError("background", "'transparent' is not supported: SD3.5 makes opaque images; use 'auto' or "
                                       "'opaque'", "unsupported_value")
    if body.stream:
        raise FieldError("stream", "streaming is not supported; leave stream out or set it to false",
                         "unsupported_value")
    if body.partial_images:
        raise FieldError("partial_images", "partial images need streaming, which is not supported; leave it out",
                         "unsupported_value")
    for name in ("frame_count", "frame_duration_ms", "svg"):
        if getattr(body, name) is not None:
            raise FieldError(name, "applies to GIF/SVG output, which this server does not make; leave it out",
                             "unsupported_value")


def rendering(body: GenerationRequest, accept: str | None) -> Rendering:
    """Raw bytes for response_format 'png' or an `Accept: image/png|jpeg|webp` header without
    application/json; JSON with base64 images otherwise."""
    fmt = body.output_format or "png"
    types = [t.split(";")[0].strip().lower() for t in (accept or "").split(",")]
    wanted = [t.removeprefix("image/") for t in types if t in ("image/png", "image/jpeg", "image/webp")]
    raw = body.response_format == "png" or (body.response_format is None and bool(wanted)
                                             and "application/json" not in types)
    if body.response_format == "png" and fmt != "png":
        raise FieldError("output_format", f"{fmt!r} conflicts with response_format 'png' (a raw PNG); use "
                                          f"response_format 'b64_json', or Accept: image/{fmt} for raw {fmt}")
    if raw and body.response_format is None and body.output_format is None:
        fmt = wanted[0]
    elif raw and body.response_format is None and fmt not in wanted:
        raise FieldError("output_format", f"{fmt!r} conflicts with the Accept header ({accept}); drop one of them")
    quality = body.output_compression if fmt in ("jpeg", "webp") else None
    return Rendering(raw, fmt, quality)


def to_job(body: GenerationRequest, limits: Limits, config: VariantConfig, seed: int,
           engine_sizes: tuple[int, int] | None = None, raw: bool = False, controlnets: tuple[str, ...] = (),
           **edit: Any) -> Job:
    """The batcher job for a request, or FieldError naming the first field out of limits.
    `engine_sizes`: (min, max) side of an engine set's profile, when serving one; `raw`: the answer
    is one raw image; `edit`: an edit's image / mask / strength (Job fields)."""
    for name in ("prompt", "negative_prompt"):
        text = getattr(body, name)
        if text is not None and len(text) > limits.max_prompt_chars:
            raise FieldError(name, f"{len(text)} characters exceed the limit of {limits.max_prompt_chars}; shorten it")
    if not body.prompt.strip():
        raise FieldError("prompt", "is empty; describe the image")
    _unsupported(body)
    lo, hi = engine_sizes or (0, limits.max_size)
    size = body.size if body.size not in (None, "auto") else f"{config.default_size}x{config.default_size}"
    height, width = parse_size(size, config, min(hi, limits.max_size), lo)
    if body.steps is not None and not 1 <= body.steps <= limits.max_steps:
        raise FieldError("steps", f"{body.steps} is outside [1, {limits.max_steps}]; pick a step count in range")
    n = 1 if body.n is None else body.n
    if not 1 <= n <= limits.max_n:
        raise FieldError("n", f"{n} is outside [1, {limits.max_n}] images per request")
    if n > 1 and raw:
        raise FieldError("n", f"{n} images need a JSON answer (response_format 'b64_json'); a raw image response "
                              f"holds one image")
    sampler = body.sampler or "euler"
    if sampler not in SAMPLER_NAMES:
        raise FieldError("sampler", f"{sampler!r} is not one of {', '.join(SAMPLER_NAMES)}", code="unsupported_value")
    controls = control_fields(body, controlnets, height, width, FieldError)  # the served ControlNets' names
    return Job(body.prompt, body.negative_prompt, seed=seed, n=n, height=height, width=width,
               steps=body.steps, guidance=body.guidance, output_type="pil", sampler=sampler,
               **skip_layer_fields(body, config), **edit, controls=controls)


def describe_validation(errors: list[dict[str, Any]]) -> tuple[str | None, str, str]:
    """pydantic/FastAPI validation errors -> (field, code, message naming the field); all are 400."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    kind, got = first.get("type", ""), first.get("input")
    if kind == "json_invalid":
        ctx = first.get("ctx", {}).get("error", "")
        return None, "invalid_json", f"request body is not valid JSON ({ctx}); send a JSON object with at least 'prompt'"
    if kind == "extra_forbidden":
        return field, "unknown_parameter", (f"{field}: unknown field (unrecognized request argument); the fields "
                                            f"are {', '.join(FIELDS)}")
    if kind == "missing" and field is None:
        return None, "missing_required_parameter", "the request needs a JSON object body with at least 'prompt'"
    if kind == "missing":
        return field, "missing_required_parameter", f"{field}: Field required; add it"
    if field is None and isinstance(got, (bytes, bytearray)):  # a body FastAPI did not parse as JSON
        return None, "invalid_request", ("the body was not read as JSON; send it with "
                                         "'Content-Type: application/json'")
    if field is None:
        return None, "invalid_type", (f"the body must be a JSON object with at least 'prompt' "
                                      f"(got {type(got).__name__})")
    code = "invalid_type" if kind.endswith("_type") or kind.endswith("_parsing") else "invalid_value"
    return field, code, f"{field}: {first.get('msg', 'invalid')} (got {got!r})"
