"""ControlNet fields of a generation request: `control_image` (base64 PNG / JPEG / WebP),
`control_type` (canny | blur; absent: the image as given, e.g. a depth map), `control_scale`
(controlnet_conditioning_scale, default 1.0) and `controlnet` (which of the served ControlNets;
optional when one is served). The server loads its ControlNets at start (`serve --controlnet
NAME=PATH`, repeatable) as one pipeline's list; a request uses one of them, the others sit it out.
A bad field is a FieldError naming it (HTTP 400 with `param`)."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..runtime.errors import InvalidInputError
from ..runtime.preprocess import CONTROL_TYPES, control_input

MAX_CONTROL_PIXELS = 4096 * 4096


def _decode(text: str, field: Any) -> Image.Image:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise field("control_image", "is not valid base64; send the PNG / JPEG / WebP bytes base64-encoded") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > MAX_CONTROL_PIXELS:
                raise field("control_image", f"is {im.width}x{im.height}; send at most {MAX_CONTROL_PIXELS} pixels")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise field("control_image", f"is not a readable image ({exc}); send a PNG, JPEG or WebP") from None


def control_fields(body: Any, names: tuple[str, ...], height: int, width: int, field: Any) -> dict | None:
    """The Job's `controls` (Pipeline call arguments) for `body`, or None without control_image.
    `names`: the served ControlNets in load order; `field`: the FieldError class."""
    if getattr(body, "control_image", None) is None:  # (an edit's body has no ControlNet fields)
        for name in ("control_type", "control_scale", "controlnet"):
            if getattr(body, name, None) is not None:
                raise field(name, "applies to control_image, which is missing; send control_image (base64) or drop it")
        return None
    if not names:
        raise field("control_image", "this server has no ControlNet; start it with --controlnet NAME=PATH",
                    "unsupported_value")
    name = body.controlnet if body.controlnet is not None else names[0] if len(names) == 1 else None
    if name not in names:
        raise field("controlnet", f"{body.controlnet!r} is not served; pick one of {', '.join(names)}"
                    if body.controlnet is not None else f"several ControlNets are served; pick one of {', '.join(names)}")
    if body.control_type is not None and body.control_type not in CONTROL_TYPES:
        raise field("control_type", f"{body.control_type!r} is not one of {', '.join(CONTROL_TYPES)} (leave it out "
                                    f"to use the image as given)", "unsupported_value")
    image = _decode(body.control_image, field)
    try:
        pixels = control_input(image, body.control_type, height, width)
    except InvalidInputError as exc:  # OpenCV missing on the server
        raise field("control_type", str(exc), "unsupported_value") from None
    k = names.index(name)
    images: list[Any] = [None] * len(names)
    images[k] = pixels
    scales = [0.0] * len(names)
    scales[k] = 1.0 if body.control_scale is None else float(body.control_scale)
    return {"control_image": images, "controlnet_conditioning_scale": scales}
