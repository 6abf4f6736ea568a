"""Images in: the `image` and `mask_image` of image-to-image and inpainting as tensors.

Our own code matching diffusers' VaeImageProcessor as the SD3 image-to-image and inpainting
pipelines configure it (facts, not code, taken from it):
  image: PIL (RGB) resized to (width, height) with Lanczos, /255; numpy [H, W, 3] / [B, H, W, 3]
         or torch [3, H, W] / [B, 3, H, W] floats in [0, 1] resized with nearest interpolation;
         then 2x - 1 -> [K, 3, H, W] in [-1, 1] (an array already below 0 is taken as [-1, 1]).
  mask:  PIL resized as the image, then converted to grayscale ("L"), /255; numpy [H, W], [H, W, 1],
         [B, H, W] or [B, H, W, 1] / torch [H, W], [B, H, W], [B, 1, H, W] in [0, 1], nearest;
         never normalized; binarized (< 0.5 -> 0, else 1) -> [M, 1, H, W]. 1 = repaint.
A list of images is a batch. Bad input raises InvalidInputError naming the argument and the fix.
With padding_mask_crop (PIL only) both are first cropped to its box and resized "fill" (runtime/crop.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .crop import Box, resize_fill
from .errors import InvalidInputError

ImageInput = Any  # PIL.Image | np.ndarray | torch.Tensor | a list of one kind


def _items(name: str, value: ImageInput) -> list:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise InvalidInputError(f"{name}=[] is empty; pass a PIL image, a numpy array or a torch tensor (or a list)")
    kinds = {type(i) for i in items}
    if not all(isinstance(i, (Image.Image, np.ndarray, torch.Tensor)) for i in items) or len(kinds) > 1:
        got = sorted(k.__name__ for k in kinds)
        raise InvalidInputError(f"{name} holds {got}; pass PIL images, numpy arrays or torch tensors, one kind")
    return items


def source_sizes(name: str, value: ImageInput, mask: bool = False) -> list[tuple[int, int]]:
    """(height, width) of every input image before any resize (to compare image and mask)."""
    sizes = []
    for item in _items(name, value):
        if isinstance(item, Image.Image):
            sizes.append((item.height, item.width))
        else:
            arr = _batch_array(name, item, mask)  # [B, C, H, W]
            sizes += [tuple(arr.shape[2:])] * arr.shape[0]
    return sizes


def _float(name: str, t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        raise InvalidInputError(f"{name} has dtype {t.dtype}; pass floats in [0, 1] (e.g. array / 255)")
    if not bool(torch.isfinite(t).all()):
        raise InvalidInputError(f"{name} contains NaN or Inf; pass finite values in [0, 1]")
    return t.float()


def _batch_array(name: str, item: np.ndarray | torch.Tensor, mask: bool) -> torch.Tensor:
    """An array or tensor as [B, C, H, W] float32 (C = 3 for images, 1 for masks)."""
    if isinstance(item, np.ndarray):
        t = _float(name, torch.from_numpy(np.ascontiguousarray(item)))
        if mask and t.dim() == 3 and t.shape[-1] in (3, 4):
            raise InvalidInputError(f"{name} has shape {tuple(item.shape)}, an RGB(A) array; pass one channel, "
                                    f"[H, W] or [H, W, 1] (e.g. mask[..., 0])")
        if mask and t.dim() == 3:  # [H, W, 1] (one mask) or [B, H, W], as diffusers reads them
            t = t[None] if t.shape[-1] == 1 else t[..., None]
        t = t[None, ..., None] if t.dim() == 2 else t  # [H, W] -> [1, H, W, 1]
        t = t[None] if t.dim() == 3 else t  # [H, W, C] -> [1, H, W, C]
        t = t.permute(0, 3, 1, 2) if t.dim() == 4 else t  # [B, C, H, W]
    else:
        t = _float(name, item)
        if mask and t.dim() in (2, 3):
            t = t[None, None] if t.dim() == 2 else t[:, None]  # [H, W] / [B, H, W] -> [B, 1, H, W]
        t = t[None] if t.dim() == 3 else t  # [C, H, W] -> [1, C, H, W]
    want = 1 if mask else 3
    if t.dim() != 4 or t.shape[1] != want:
        shapes = "[H, W], [H, W, 1] or [B, H, W, 1]" if mask else "[H, W, 3] or [B, H, W, 3] (torch: [B, 3, H, W])"
        raise InvalidInputError(f"{name} has shape {tuple(item.shape)}: {want} channel(s) expected; pass {shapes}")
    return t


def _pil(name: str, item: Image.Image, height: int, width: int, mask: bool, box: Box | None) -> torch.Tensor:
    if not mask and item.mode != "RGB":
        raise InvalidInputError(f"{name} is a PIL image in mode {item.mode!r}; pass image.convert('RGB')")
    if box is None:
        resized = item.resize((width, height), resample=Image.LANCZOS)
    else:
        resized = resize_fill(item.crop(box), width, height)
    if mask:
        resized = resized.convert("L")
    arr = np.array(resized).astype(np.float32) / 255.0  # [H, W] or [H, W, 3]
    t = torch.from_numpy(arr)
    return t[None, None] if mask else t.permute(2, 0, 1)[None]  # [1, C, H, W]


def preprocess(name: str, value: ImageInput, height: int, width: int, mask: bool = False,
               box: Box | None = None) -> torch.Tensor:
    """`value` as [K, 3, H, W] in [-1, 1] (image) or [M, 1, H, W] in {0, 1} (mask), fp32, CPU;
    `box`: padding_mask_crop's region (PIL inputs)."""
    items = _items(name, value)
    if isinstance(items[0], Image.Image):
        out = torch.cat([_pil(name, i, height, width, mask, box) for i in items])
    else:
        arrays = [_batch_array(name, i, mask) for i in items]
        if len({tuple(a.shape[1:]) for a in arrays}) > 1:
            raise InvalidInputError(f"{name}: the arrays differ in shape; pass arrays of one size")
        out = F.interpolate(torch.cat(arrays), size=(height, width))  # nearest, as diffusers
    if mask:
        return (out >= 0.5).float()  # [M, 1, H, W]
    return out * 2.0 - 1.0 if out.min() >= 0 else out  # [K, 3, H, W]
