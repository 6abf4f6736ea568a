"""Images out: PIL conversion and atomic PNG writes with generation metadata."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, PngImagePlugin

from .files import atomic_write


def to_pil(array: np.ndarray) -> list[Image.Image]:
    """[B, H, W, 3] floats in [0, 1] -> PIL images (rounded as diffusers does)."""
    return [Image.fromarray(img) for img in (array * 255).round().astype(np.uint8)]


def _png_info(metadata: Mapping[str, object]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_itxt(f"sd35trt:{key}", str(value))
    return info


def png_bytes(image: Image.Image, metadata: Mapping[str, object]) -> bytes:
    """`image` as PNG bytes with the same `sd35trt:*` text chunks as `save_png`."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=_png_info(metadata))
    return buf.getvalue()


def save_png(image: Image.Image, path: str | Path, metadata: Mapping[str, object]) -> Path:
    """Write `image` to `path` atomically (temp file + rename) with tEXt metadata."""
    info = _png_info(metadata)
    return atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))
