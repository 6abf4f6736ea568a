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


def test_eager_in_place_form_is_bitwise_the_expression() -> None:
    """Eager gelu_tanh_sigmoid runs in place (one fp32 temporary); it equals the expression exactly."""
    def expression(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.sigmoid(1.5957691216057308 * (xf + 0.044715 * xf * xf * xf))).to(x.dtype)

    x = torch.randn(3, 257, 96, generator=torch.Generator().manual_seed(0)) * 4  # [B, N, 4D]
    for t in (x, x.bfloat16(), x.half()):
        before = t.clone()
        assert torch.equal(gelu_tanh_sigmoid(t), expression(t)) and torch.equal(t, before)  # input untouched
