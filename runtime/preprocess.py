"""ControlNet preprocessors the project runs itself: canny edges and Gaussian blur (OpenCV, the
`control` extra: opencv-python-headless), and the pixels Stability's canny ControlNet expects.

  canny  RGB -> grayscale (cv2.COLOR_RGB2GRAY) -> cv2.Canny(gray, 100, 200) -> white edges on
         black, replicated to RGB: the SD3.5 Large canny ControlNet's conditioning image, with
         the thresholds Stability's model card uses;
  blur   cv2.GaussianBlur(rgb, (k, k), sigma), k = 51 and sigma = 0 (OpenCV derives
         0.3 * ((k - 1) / 2 - 1) + 0.8 = 8.0 from k) by default. Stability's card blurs with
         torchvision's GaussianBlur, whose sigma is drawn at random in [0.1, 2] on every call,
         so no fixed setting reproduces it; kernel and sigma are arguments (CLI flags).
Depth maps are supplied by the user (no depth estimator here).

The canny ControlNet was trained with the edge image fed to the VAE as x * 255 * 0.5 + 0.5
(x in [0, 1]) instead of 2x - 1 (Stability's sd3_infer.py, and the SD3CannyImageProcessor of the
model card's diffusers example); `control_input(..., "canny")` returns that tensor, which the
pipeline takes as it is (a tensor control_image is never renormalised, as in diffusers).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import InvalidInputError

CONTROL_TYPES = ("canny", "blur")
# Stability's card for stabilityai/stable-diffusion-3.5-large-controlnet-canny preprocesses with
# grayscale -> cv2.Canny(img, 100, 200) (its "Preprocessing" snippet: torchvision to_tensor, cv2.cvtColor
# RGB2GRAY, cv2.Canny). Checked 2026-12-01 through copies of that snippet in public code (e.g. a fork of
# Stability-AI/sd3.5's sd3_infer.py whose preprocess_canny defaults to 100 / 200); the stored copy of the
# card itself ends before that section. Stability's sd3_infer.py takes an already-made edge image.
CANNY_THRESHOLDS = (100, 200)
BLUR_KERNEL, BLUR_SIGMA = 51, 0.0


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as exc:
        raise InvalidInputError("the canny / blur preprocessors need OpenCV; pip install 'sd35trt[control]' "
                                "(opencv-python-headless), or pass a preprocessed control image") from exc
    return cv2


def _rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 RGB from a PIL image or an array (uint8, or floats in [0, 1])."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise InvalidInputError(f"control image has shape {arr.shape}; pass an RGB image [H, W, 3]")
    if arr.dtype != np.uint8:
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise InvalidInputError("a float control image must hold finite values in [0, 1]")
        arr = (arr * 255.0).round().astype(np.uint8)
    return np.ascontiguousarray(arr)


def canny(image: Image.Image | np.ndarray, low: int = CANNY_THRESHOLDS[0], high: int = CANNY_THRESHOLDS[1]) -> Image.Image:
    """White-on-black canny edges of `image`, as an RGB PIL image of its size."""
    if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high):
        raise InvalidInputError(f"canny thresholds ({low!r}, {high!r}) must be ints with 0 <= low <= high "
                                f"(default {CANNY_THRESHOLDS})")
    cv2 = _cv2()
    edges = cv2.Canny(cv2.cvtColor(_rgb(image), cv2.COLOR_RGB2GRAY), low, high)  # [H, W] in {0, 255}
    return Image.fromarray(np.repeat(edges[..., None], 3, axis=-1))


def blur(image: Image.Image | np.ndarray, kernel: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> Image.Image:
    """`image` Gaussian-blurred (kernel x kernel, odd; sigma 0: derived from the kernel), RGB PIL."""
    if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise InvalidInputError(f"blur kernel={kernel!r} must be an odd int >= 1 (default {BLUR_KERNEL})")
    if not isinstance(sigma, (int, float)) or not np.isfinite(sigma) or sigma < 0:
        raise InvalidInputError(f"blur sigma={sigma!r} must be a finite number >= 0 (0: derived from the kernel)")
    cv2 = _cv2()
    return Image.fromarray(cv2.GaussianBlur(_rgb(image), (kernel, kernel), float(sigma)))


def control_input(image: Image.Image, control_type: str | None, height: int, width: int) -> Image.Image | torch.Tensor:
    """What to pass as `control_image` for a raw `image` and a ControlNet of `control_type`
    (canny | blur | None: the image as given, e.g. a depth map): canny -> the edge image as the
    tensor [1, 3, H, W] the canny ControlNet's VAE input expects; blur -> the blurred PIL image."""
    if control_type not in (None, *CONTROL_TYPES):
        raise InvalidInputError(f"control_type={control_type!r} must be one of {list(CONTROL_TYPES)} (or none: the "
                                f"control image is used as given)")
    if not isinstance(image, Image.Image):
        raise InvalidInputError(f"control image is a {type(image).__name__}; pass a PIL image")
    image = image.convert("RGB").resize((width, height), resample=Image.LANCZOS)
    if control_type == "blur":
        return blur(image)
    if control_type is None:
        return image
    edges = np.asarray(canny(image)).astype(np.float32) / 255.0  # [H, W, 3] in {0, 1}
    return torch.from_numpy(edges).permute(2, 0, 1)[None] * 255.0 * 0.5 + 0.5  # [1, 3, H, W]
