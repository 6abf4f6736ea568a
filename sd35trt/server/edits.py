"""POST /v1/images/edits: OpenAI's image-edit request (a multipart form) as a batcher job.

Form fields (OpenAI's names; values are text, read as the JSON fields of /v1/images/generations):
  image            one PNG, JPEG or WebP file (as `image` or OpenAI's `image[]`). Several images are
                   refused: OpenAI composes them into one picture, which SD3.5 image-to-image
                   cannot do; send one request per image (concurrent edits of one size batch).
                   EXIF orientation is applied; an alpha channel of the image is ignored.
  mask             optional; with it the request is inpainting, without it image-to-image. OpenAI's
                   convention: transparent (alpha < 128) = edit, opaque = keep. A mask without
                   transparency (no alpha channel, or alpha 255 everywhere) is read as black/white:
                   white (luma >= 128) = edit. When a mask has both, its alpha wins. It must be the
                   image's size (in pixels, after orientation).
  prompt, n, size, response_format, output_format, output_compression, background, model, ...
                   as on generations; size "auto" (or none) = the image's size, rounded down to
                   multiples of 16; another size resizes the image (and mask) to it.
  input_fidelity, quality, user, ...   accepted and ignored; markup, stream refused.
Our own: strength (0, 1], default 0.6; steps, guidance, seed, negative_prompt, sampler, and the
skip-layer guidance fields (skip_guidance_layers as repeated fields or "7,8,9").
Limits: each file at most `Limits.max_image_bytes` and `max_image_pixels`. Every refusal is a 400
`invalid_request_error` naming the field, as on generations.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from .fields import FieldError
from .schema import GenerationRequest, Limits, describe_validation

EDITS = "/v1/images/edits"
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
FILES = ("image", "mask")
LISTS = ("skip_guidance_layers",)


class EditRequest(GenerationRequest):
    """The text fields of POST /v1/images/edits (form values: "4" is read as 4)."""

    model_config = ConfigDict(extra="forbid", strict=False, protected_namespaces=())

    strength: float | None = Field(None, gt=0, le=1, allow_inf_nan=False,
                                   description="how much of the image is re-noised, (0, 1]; default 0.6")
    input_fidelity: str | None = Field(None, description="accepted and ignored")


@dataclass(frozen=True)
class Edit:
    body: EditRequest
    image: bytes
    mask: bytes | None


async def read_edit(request: Request, limits: Limits) -> Edit:
    """The form's fields and files, or FieldError naming the first wrong one (nothing decoded yet)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise FieldError(None, f"an edit is a multipart/form-data request (got {ctype or 'no content type'!r}); "
                               f"send the image as a file part 'image' and the prompt as a form field",
                         "invalid_request")
    length = int(request.headers.get("content-length") or 0)
    if length > 2 * limits.max_image_bytes + 2**20:  # refused before the body is read
        raise FieldError("image", f"the request body of {length} bytes exceeds what an image and a mask of at most "
                                  f"{limits.max_image_bytes} bytes each need; send smaller files")
    try:
        form = await request.form(max_files=4, max_fields=64)
    except Exception as exc:  # starlette's MultiPartException / HTTPException: a malformed form
        raise FieldError(None, f"the multipart form could not be read ({getattr(exc, 'detail', exc)})",
                         "invalid_request") from None
    fields: dict[str, Any] = {}
    files: dict[str, list[UploadFile]] = {}
    for key, value in form.multi_items():
        name = key.removesuffix("[]")
        if isinstance(value, UploadFile):
            if name not in FILES:
                raise FieldError(name, "a file here is not supported; this server takes the files 'image' and "
                                       "'mask'", "unsupported_value")
            files.setdefault(name, []).append(value)
        elif name in FILES:
            raise FieldError(name, "must be a file part (multipart file upload), not a text field")
        elif name in LISTS:
            fields.setdefault(name, []).extend(v.strip() for v in value.split(",") if v.strip())
        elif name in fields:
            raise FieldError(name, "was sent more than once; send it once")
        else:
            fields[name] = value
    try:
        body = EditRequest.model_validate(fields)
    except ValidationError as exc:
        field, code, message = describe_validation(list(exc.errors()))
        raise FieldError(field, message, code, prefix=False) from None
    if body.prompt is None or not files.get("image"):
        raise FieldError("image", "missing: send the image to edit as a file part 'image'",
                         "missing_required_parameter")
    if len(files["image"]) > 1:
        raise FieldError("image", f"{len(files['image'])} images were sent; this server edits one image per request "
                                  f"(SD3.5 cannot compose several); send one request per image: concurrent edits "
                                  f"of one size run as one batch", "unsupported_value")
    if len(files.get("mask", [])) > 1:
        raise FieldError("mask", "several masks were sent; send one (the image's size)")
    image = await _read(files["image"][0], "image", limits)
    mask = await _read(files["mask"][0], "mask", limits) if files.get("mask") else None
    return Edit(body, image, mask)


async def _read(upload: UploadFile, field: str, limits: Limits) -> bytes:
    data = await upload.read(limits.max_image_bytes + 1)
    if len(data) > limits.max_image_bytes:
        raise FieldError(field, f"the file is larger than the limit of {limits.max_image_bytes} bytes; send a "
                                f"smaller image")
    if not data:
        raise FieldError(field, "the file is empty; send a PNG, JPEG or WebP image")
    return data


def decode(field: str, data: bytes, limits: Limits) -> Image.Image:
    """PNG / JPEG / WebP bytes as a PIL image, oriented; FieldError for anything else or too many pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        w, h = im.size
        if w * h > limits.max_image_pixels:
            raise FieldError(field, f"is {w}x{h} = {w * h} pixels, over the limit of {limits.max_image_pixels}; "
                                    f"send a smaller image")
        im.load()
        return ImageOps.exif_transpose(im)
    except FieldError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise FieldError(field, f"is not a readable PNG, JPEG or WebP image ({type(exc).__name__}: {exc}); "
                                f"send one of those") from None


def repaint_mask(mask: Image.Image) -> Image.Image:
    """The mask as an 'L' image, 255 = repaint: alpha inverted when the mask has transparent pixels
    (OpenAI's convention), else its luma (white = repaint)."""
    if "A" in mask.getbands() or "transparency" in mask.info:
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return ImageOps.invert(alpha)
    return mask.convert("L")


def edit_inputs(edit: Edit, limits: Limits) -> dict[str, Any]:
    """The Job fields of an edit (image, mask, strength) and its auto size, decoded and checked."""
    image = decode("image", edit.image, limits)
    out: dict[str, Any] = {"image": image.convert("RGB")}
    if edit.body.strength is not None:
        out["strength"] = edit.body.strength
    if edit.mask is not None:
        mask = decode("mask", edit.mask, limits)
        if mask.size != image.size:
            raise FieldError("mask", f"is {mask.width}x{mask.height} but the image is {image.width}x{image.height}; "
                                     f"send a mask of the image's size")
        repaint = repaint_mask(mask)
        if repaint.getextrema()[1] < 128:
            raise FieldError("mask", "marks nothing to edit: make the area to edit transparent (alpha 0), or white "
                                     "on black in a mask without transparency")
        out["mask"] = repaint
    return out


def auto_size(image: Image.Image) -> str:
    """size 'auto': the image's own size, rounded down to multiples of 16."""
    return f"{max(16, image.width // 16 * 16)}x{max(16, image.height // 16 * 16)}"

