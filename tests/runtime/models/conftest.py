"""Fixtures for the model tests: a tiny MMDiT with seeded random weights and one step's inputs."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from sd35trt.export.tiny_model import TINY_TRANSFORMERS
from sd35trt.runtime.models.mmdit import MMDiT


def tiny_mmdit_and_inputs(family: str) -> tuple[MMDiT, tuple[torch.Tensor, ...]]:
    """The tiny `family` MMDiT in bf16 (weights N(0, 0.05), seed 0) and (latent, t, context, pooled):
    2 x 64 image rows at 16x16 latents, 2 x 12 context rows."""
    torch.manual_seed(0)
    spec = TINY_TRANSFORMERS[family]
    model = MMDiT(spec).eval().requires_grad_(False).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    lat = torch.randn(2, spec.in_channels, 16, 16, dtype=torch.bfloat16)  # [B, 16, H/8, W/8]
    ctx = torch.randn(2, 12, spec.joint_attention_dim, dtype=torch.bfloat16)  # [B, T, 4096-like]
    pooled = torch.randn(2, spec.pooled_projection_dim, dtype=torch.bfloat16)  # [B, pooled]
    return model, (lat, torch.tensor([700.0, 300.0]), ctx, pooled)


@pytest.fixture
def tiny_mmdit() -> Callable[[str], tuple[MMDiT, tuple[torch.Tensor, ...]]]:
    return tiny_mmdit_and_inputs
