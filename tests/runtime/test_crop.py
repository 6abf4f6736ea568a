"""padding_mask_crop's pieces equal diffusers' VaeImageProcessor (get_crop_region, resize "fill",
apply_overlay) on masks that hit every branch: wide and tall regions, regions at each border
(the box is shifted back inside), padding clipped by the image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sd35trt.runtime.crop import Overlay, crop_box, resize_fill

image_processor = pytest.importorskip("diffusers.image_processor", reason="diffusers (test extra) is the reference")
VAE = image_processor.VaeImageProcessor()

# (mask height, width, region rows, region cols, processing width, height, pad)
MASKS = [
    (72, 88, (30, 44), (50, 62), 96, 64, 6),  # tall region, wide output: widened
    (64, 64, (10, 14), (5, 60), 64, 64, 0),  # wide region: heightened
    (80, 60, (0, 6), (0, 60), 48, 64, 4),  # top border, full width
    (80, 60, (70, 80), (40, 58), 96, 64, 3),  # bottom-right corner: shifted back inside
    (50, 90, (20, 30), (85, 90), 64, 96, 10),  # right border, tall output
    (40, 40, (0, 40), (0, 40), 64, 64, 8),  # everything masked
]


def _mask(h: int, w: int, rows: tuple[int, int], cols: tuple[int, int]) -> Image.Image:
    m = np.zeros((h, w), np.uint8)
    m[rows[0] : rows[1], cols[0] : cols[1]] = 255
    return Image.fromarray(m)


def _picture(h: int, w: int) -> Image.Image:
    g = np.random.default_rng(h * w)
    return Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("case", MASKS, ids=[f"{c[0]}x{c[1]}-{c[4]}x{c[5]}" for c in MASKS])
def test_crop_box_and_fill_and_overlay_match_diffusers(case) -> None:
    h, w, rows, cols, width, height, pad = case
    mask, pic = _mask(h, w, rows, cols), _picture(h, w)
    box = crop_box(mask, width, height, pad)
    assert box == tuple(VAE.get_crop_region(mask, width, height, pad=pad))
    x1, y1, x2, y2 = box
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    crop = pic.crop(box)
    assert np.array_equal(np.asarray(resize_fill(crop, width, height)),
                          np.asarray(VAE.resize(crop, height, width, resize_mode="fill")))
    generated = _picture(height, width)
    ours = Overlay(pic, mask, box).paste(generated)
    assert np.array_equal(np.asarray(ours), np.asarray(VAE.apply_overlay(mask, pic, generated, box)))
