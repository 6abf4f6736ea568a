"""`padding_mask_crop`: inpaint only a padded box around the mask, then paste the result back.

Semantics of diffusers' StableDiffusion3InpaintPipeline with padding_mask_crop (its
VaeImageProcessor.get_crop_region, resize_mode="fill", apply_overlay; facts, our code):
  1. the box: the smallest rectangle holding every non-zero pixel of the mask (as grayscale),
     grown by `pad` on each side (clipped to the image), then widened or heightened about its
     centre to the aspect ratio of width x height (shifted back inside the image where it overflows);
  2. image and mask are cropped to the box and resized to width x height keeping their aspect
     ratio (Lanczos), the few rows or columns left over filled by stretching the edge (resize "fill");
  3. after decoding, each generated image is resized to the box keeping its aspect ratio (centre
     crop), pasted into the box of a blank canvas of the original's size, and the original is laid
     over it through the inverted mask: outside the mask the output IS the original image.
Only PIL images and masks (one of each), as diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .errors import InvalidInputError

Box = tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive


def _span(used: np.ndarray) -> tuple[int, int]:
    """First and one-past-last index where `used` [N] is True."""
    idx = np.flatnonzero(used)
    return int(idx[0]), int(idx[-1]) + 1


def _fit(lo: int, hi: int, grow: int, limit: int) -> tuple[int, int]:
    """[lo, hi) grown by `grow` (half before, the rest after), moved back inside [0, limit)."""
    lo, hi = lo - grow // 2, hi + grow - grow // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def crop_box(mask: Image.Image, width: int, height: int, pad: int) -> Box:
    """The box of step 1 for a mask (PIL, any mode) and the processing size width x height."""
    m = np.array(mask.convert("L")) != 0  # [H, W]
    rows, cols = m.any(axis=1), m.any(axis=0)
    if not rows.any():
        raise InvalidInputError("mask_image has no non-zero pixel, so padding_mask_crop finds no region; white (1) "
                                "marks what to repaint")
    (top, bottom), (left, right) = _span(rows), _span(cols)
    h, w = m.shape
    x1, y1, x2, y2 = max(left - pad, 0), max(top - pad, 0), min(right + pad, w), min(bottom + pad, h)
    target = width / height
    if (x2 - x1) / (y2 - y1) > target:
        y1, y2 = _fit(y1, y2, int((x2 - x1) / target - (y2 - y1)), mask.height)
    else:
        x1, x2 = _fit(x1, x2, int((y2 - y1) * target - (x2 - x1)), mask.width)
    return x1, y1, x2, y2


def resize_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Step 2's resize: aspect kept, centred on a width x height RGB canvas, the gap filled by
    stretching the first and last row (or column) of the resized image."""
    ratio, src = width / height, image.width / image.height
    w = width if ratio < src else image.width * height // image.height
    h = height if ratio >= src else image.height * width // image.width
    resized = image.resize((w, h), resample=Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - w // 2, height // 2 - h // 2))
    if ratio < src and (gap := height // 2 - h // 2) > 0:
        out.paste(resized.resize((width, gap), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(resized.resize((width, gap), box=(0, h, width, h)), box=(0, gap + h))
    elif ratio > src and (gap := width // 2 - w // 2) > 0:
        out.paste(resized.resize((gap, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(resized.resize((gap, height), box=(w, 0, w, height)), box=(gap + w, 0))
    return out


def _resize_cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """Aspect kept, scaled to cover width x height, centred (the excess cut off)."""
    ratio, src = width / height, image.width / image.height
    w = width if ratio > src else image.width * height // image.height
    h = height if ratio <= src else image.height * width // image.width
    out = Image.new("RGB", (width, height))
    out.paste(image.resize((w, h), resample=Image.LANCZOS), box=(width // 2 - w // 2, height // 2 - h // 2))
    return out


@dataclass(frozen=True)
class Overlay:
    """Step 3 for every image of a request: the original, its mask and the box."""

    original: Image.Image
    mask: Image.Image
    box: Box

    def paste(self, image: Image.Image) -> Image.Image:
        x1, y1, x2, y2 = self.box
        canvas = Image.new("RGBA", self.original.size)
        canvas.paste(_resize_cover(image, x2 - x1, y2 - y1), (x1, y1))
        kept = Image.new("RGBa", self.original.size)  # premultiplied: the mask's grey levels blend
        kept.paste(self.original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(self.mask.convert("L")))
        out = canvas.convert("RGB").convert("RGBA")
        out.alpha_composite(kept.convert("RGBA"))
        return out.convert("RGB")

    def apply(self, images: list[Image.Image]) -> list[Image.Image]:
        return [self.paste(i) for i in images]


def _one_pil(name: str, value: Any) -> Image.Image:
    item = value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value
    if not isinstance(item, Image.Image):
        raise InvalidInputError(f"padding_mask_crop needs {name} as one PIL image (got {type(value).__name__}), as "
                                f"diffusers; pass PIL.Image.fromarray(...) or drop padding_mask_crop")
    return item


def prepare(image: Any, mask_image: Any, pad: Any, width: int, height: int) -> Overlay:
    """Checks padding_mask_crop's inputs and finds the box (InvalidInputError naming the fix)."""
    if mask_image is None:
        raise InvalidInputError(f"padding_mask_crop={pad!r} applies to inpainting; pass mask_image= or drop it")
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
        raise InvalidInputError(f"padding_mask_crop={pad!r} must be an int >= 0 (pixels around the mask), e.g. 32")
    original, mask = _one_pil("image", image), _one_pil("mask_image", mask_image)
    if original.size != mask.size:
        raise InvalidInputError(f"mask_image is {mask.height}x{mask.width} but image is {original.height}x"
                                f"{original.width} (height x width); pass a mask of the image's size")
    return Overlay(original, mask, crop_box(mask, width, height, pad))
