"""Images out: PIL conversion and atomic PNG writes with generation metadata."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, PngImagePlugin


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = _png_info(metadata)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; an image is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
