"""ControlNet preprocessors against OpenCV's reference output and the Gaussian's own math."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sd35trt.runtime import InvalidInputError
from sd35trt.runtime.preprocess import blur, canny, control_input

cv2 = pytest.importorskip("cv2", reason="opencv-python-headless (the control extra) runs the preprocessors")


def _photo(h: int = 96, w: int = 128, seed: int = 0) -> Image.Image:
    """Shapes with hard edges plus mild noise, [h, w] RGB."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.float64)
    img[(yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (h / 4) ** 2] = (220, 60, 40)
    img[h // 6 : h // 2, w // 2 : w - 8] = (30, 200, 90)
    img += g.normal(0, 4, img.shape) + 20
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def test_canny_equals_opencv_reference() -> None:
    image = _photo()
    ref = cv2.Canny(cv2.cvtColor(np.array(image), cv2.COLOR_RGB2GRAY), 100, 200)  # [H, W] in {0, 255}
    got = np.asarray(canny(image))  # [H, W, 3]
    assert got.shape == (96, 128, 3)
    assert np.array_equal(got[..., 0], ref) and np.array_equal(got[..., 1], ref) and np.array_equal(got[..., 2], ref)
    assert set(np.unique(got)) == {0, 255} and 0.01 < float((ref > 0).mean()) < 0.3
    loose = np.asarray(canny(image, 20, 40))[..., 0]
    assert int((loose > 0).sum()) > int((ref > 0).sum())  # lower thresholds find more edges


def _gaussian_reference(rgb: np.ndarray, k: int, sigma: float) -> np.ndarray:
    """Separable Gaussian in float64, OpenCV's default border (reflect-101)."""
    sigma = sigma or 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    x = np.arange(k) - (k - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    g /= g.sum()
    pad = k // 2
    a = np.pad(rgb.astype(np.float64), ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    a = np.apply_along_axis(lambda r: np.convolve(r, g, mode="valid"), 0, a)
    return np.apply_along_axis(lambda r: np.convolve(r, g, mode="valid"), 1, a)


@pytest.mark.parametrize("kernel,sigma", [(51, 0.0), (9, 2.0)])
def test_blur_equals_opencv_reference_and_the_gaussian(kernel: int, sigma: float) -> None:
    image = _photo()
    rgb = np.array(image)
    got = np.asarray(blur(image, kernel, sigma)).astype(np.int32)
    assert np.array_equal(got, cv2.GaussianBlur(rgb, (kernel, kernel), sigma))
    math = _gaussian_reference(rgb, kernel, sigma)
    assert float(np.abs(got - math).max()) <= 1.5  # OpenCV rounds its uint8 fixed-point result
    assert float(np.abs(np.diff(got.astype(float), axis=1)).max()) < float(np.abs(np.diff(rgb.astype(float), axis=1)).max())


def test_control_input_per_type() -> None:
    image = _photo()
    edges = control_input(image, "canny", 64, 80)  # the canny ControlNet's VAE input
    assert isinstance(edges, torch.Tensor) and edges.shape == (1, 3, 64, 80)
    assert set(torch.unique(edges).tolist()) == {0.5, 128.0}  # x * 255 * 0.5 + 0.5 of {0, 1}
    resized = image.resize((80, 64), resample=Image.LANCZOS)
    want = cv2.Canny(cv2.cvtColor(np.array(resized), cv2.COLOR_RGB2GRAY), 100, 200) > 0
    assert torch.equal(edges[0, 0] > 1, torch.from_numpy(want))
    blurred = control_input(image, "blur", 64, 80)
    assert isinstance(blurred, Image.Image) and blurred.size == (80, 64)
    assert control_input(image, None, 64, 80).size == (80, 64)


def test_preprocessors_refuse_bad_settings() -> None:
    image = _photo()
    with pytest.raises(InvalidInputError, match="kernel=50"):
        blur(image, 50)
    with pytest.raises(InvalidInputError, match="sigma=-1"):
        blur(image, 5, -1)
    with pytest.raises(InvalidInputError, match=r"thresholds \(200, 100\)"):
        canny(image, 200, 100)
    with pytest.raises(InvalidInputError, match="control_type='depth'"):
        control_input(image, "depth", 64, 64)
    with pytest.raises(InvalidInputError, match=r"shape \(4, 4\)"):
        canny(np.zeros((4, 4), np.uint8))
