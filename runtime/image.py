"""Images out: PIL conversion, encoding (PNG / JPEG / WebP) with generation metadata, atomic writes.

Metadata: PNG carries one `sd35trt:<key>` iTXt chunk per key; JPEG and WebP carry the same keys as
one JSON object (ASCII) in the EXIF ImageDescription tag, with Software = "sd35trt"
(`read_metadata` reads either back).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, PngImagePlugin

from .errors import InvalidInputError
from .files import atomic_write
from .guidance import SkipLayerGuidance

FORMATS = ("png", "jpeg", "webp")
EXTENSIONS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_PIL = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_DESCRIPTION, _SOFTWARE = 0x010E, 0x0131  # EXIF IFD0 tags
DEFAULT_QUALITY = 95  # JPEG / WebP, when the caller names none


def to_pil(array: np.ndarray) -> list[Image.Image]:
    """[B, H, W, 3] floats in [0, 1] -> PIL images (rounded as diffusers does)."""
    return [Image.fromarray(img) for img in (array * 255).round().astype(np.uint8)]


def format_for(path: str | Path) -> str:
    """png | jpeg | webp from a file name's extension, or InvalidInputError naming it."""
    ext = Path(path).suffix.lower()
    if ext not in EXTENSIONS:
        raise InvalidInputError(f"{path}: unknown image extension {ext or '(none)'!r}; end the name with "
                                f"{', '.join(EXTENSIONS)}")
    return EXTENSIONS[ext]


def _save_kwargs(fmt: str, metadata: Mapping[str, object], quality: int | None) -> dict:
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_itxt(f"sd35trt:{key}", str(value))
        return {"pnginfo": info}
    if fmt not in _PIL:
        raise InvalidInputError(f"image format {fmt!r} is not one of {FORMATS}")
    exif = Image.Exif()
    exif[_DESCRIPTION] = json.dumps({f"sd35trt:{k}": str(v) for k, v in metadata.items()}, sort_keys=True)
    exif[_SOFTWARE] = "sd35trt"
    q = DEFAULT_QUALITY if quality is None else quality
    if not (type(q) is int and 0 <= q <= 100):
        raise InvalidInputError(f"quality={quality!r} must be an int in [0, 100]")
    return {"exif": exif.tobytes(), "quality": q}


def encode_image(image: Image.Image, fmt: str, metadata: Mapping[str, object], quality: int | None = None) -> bytes:
    """`image` as `fmt` (png | jpeg | webp) bytes with its metadata; `quality` (0-100) for JPEG/WebP."""
    kwargs = _save_kwargs(fmt, metadata, quality)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=_PIL[fmt], **kwargs)
    return buf.getvalue()


def png_bytes(image: Image.Image, metadata: Mapping[str, object]) -> bytes:
    """`image` as PNG bytes with the same `sd35trt:*` text chunks as `save_image`."""
    return encode_image(image, "png", metadata)


def save_image(image: Image.Image, path: str | Path, metadata: Mapping[str, object],
               quality: int | None = None) -> Path:
    """Write `image` to `path` atomically (temp file + rename) in the format its extension names
    (.png, .jpg/.jpeg, .webp), with metadata."""
    fmt = format_for(path)
    data = encode_image(image, fmt, metadata, quality)
    return atomic_write(path, lambda f: f.write(data))


def save_png(image: Image.Image, path: str | Path, metadata: Mapping[str, object]) -> Path:
    """Write `image` as PNG to `path` atomically, whatever its extension."""
    data = encode_image(image, "png", metadata)
    return atomic_write(path, lambda f: f.write(data))


def read_metadata(image: Image.Image) -> dict[str, str]:
    """The `sd35trt:*` metadata of an image written here (PNG text chunks or JPEG/WebP EXIF)."""
    text = {k: v for k, v in getattr(image, "text", {}).items() if k.startswith("sd35trt:")}
    if text:
        return text
    description = image.getexif().get(_DESCRIPTION)
    try:
        doc = json.loads(description) if description else {}
    except ValueError:
        return {}
    return {k: v for k, v in doc.items() if k.startswith("sd35trt:")} if isinstance(doc, dict) else {}



def mode_metadata(mode: str, strength: float | None = None, slg: SkipLayerGuidance | None = None) -> dict[str, str]:
    """The metadata keys that say which mode ran: `mode` (text-to-image | image-to-image |
    inpainting), `strength` (image modes only) and `slg` ("off", or "7,8,9 scale=2.8 start=0.01
    stop=0.2": skip-layer guidance's blocks, scale and window)."""
    meta = {"mode": mode}
    if mode != "text-to-image" and strength is not None:
        meta["strength"] = f"{strength:g}"
    meta["slg"] = "off" if slg is None else (f"{','.join(str(k) for k in slg.layers)} scale={slg.scale:g} "
                                             f"start={slg.start:g} stop={slg.stop:g}")
    return meta
