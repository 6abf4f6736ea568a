"""The GPU benchmark's CPU-side pieces: seeded random models and the fidelity figures it reports."""

from __future__ import annotations

import torch

from sd35trt.bench import fidelity, random_mmdit
from sd35trt.export.tiny_model import TINY_TRANSFORMERS
from sd35trt.runtime.config import VariantConfig


def test_random_models_are_seeded() -> None:
    config = VariantConfig("tiny", "medium", TINY_TRANSFORMERS["medium"])
    a, b = (random_mmdit(config, torch.bfloat16, "cpu", seed=3) for _ in range(2))
    c = random_mmdit(config, torch.bfloat16, "cpu", seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.proj_out.weight, c.proj_out.weight)
    assert a.proj_out.weight.dtype == torch.bfloat16 and 0.01 < float(a.proj_out.weight.float().std()) < 0.03


def test_fidelity_figures() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1  # an image in [-1, 1]
    same = fidelity(ref.clone(), ref)
    assert same["cos_vs_bf16"] == 1.0 and same["rel_l2"] == 0.0 and same["psnr_db"] >= 150
    noisy = fidelity(ref + 0.02 * torch.randn(ref.shape, generator=g), ref)
    assert 30 < noisy["psnr_db"] < 45 and 0.99 < noisy["cos_vs_bf16"] < 1.0
    assert "psnr_db" not in fidelity(torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4))  # latents: no PSNR
