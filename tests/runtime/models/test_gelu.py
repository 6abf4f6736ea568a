"""The sigmoid-form GELU(tanh) the torch-fp8 backend swaps in is the same function."""

from __future__ import annotations

import torch

from sd35trt.export.tiny_model import TINY_TRANSFORMERS
from sd35trt.runtime.models.mmdit import MMDiT, gelu_tanh, gelu_tanh_sigmoid, use_sigmoid_gelu


def test_sigmoid_gelu_is_the_tanh_gelu() -> None:
    x = torch.linspace(-12, 12, 100_001)
    assert (gelu_tanh(x) - gelu_tanh_sigmoid(x)).abs().max() <= 2e-6
    xb = x.bfloat16()
    assert (gelu_tanh(xb).float() - gelu_tanh_sigmoid(xb).float()).abs().max() <= 2 ** -6
    model = MMDiT(TINY_TRANSFORMERS["medium"]).eval()
    use_sigmoid_gelu(model)
    assert all(m.act is gelu_tanh_sigmoid for m in model.modules() if hasattr(m, "act"))
    use_sigmoid_gelu(model, enabled=False)
    assert all(m.act is gelu_tanh for m in model.modules() if hasattr(m, "act"))
