"""FP8 building blocks that run on the CPU: weight-only FP8 Linear (T5-XXL), FP8Linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sd35trt.runtime.models.fp8 import E4M3, FP8WeightLinear, fp8_weights_only


def test_weight_only_fp8_linear_is_close_and_stores_fp8() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 384)
    x = torch.randn(4, 7, 256)
    ref = lin(x)
    q = FP8WeightLinear(lin)
    assert q.weight_fp8.dtype == E4M3 and q.weight.dtype == torch.float32 and q.weight.numel() == 0
    y = q(x)
    cos = F.cosine_similarity(y.flatten(), ref.flatten(), dim=0)
    assert y.shape == ref.shape and cos > 0.999 and not torch.equal(y, ref)
    # the output-side scale equals dequantizing the weight first
    w = q.weight_fp8.float() * q.scale
    assert torch.allclose(y, F.linear(x, w, lin.bias), atol=1e-5, rtol=1e-5)


def test_fp8_weights_only_replaces_every_linear() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4, bias=False))
    fp8_weights_only(model)
    assert [type(m).__name__ for m in model] == ["FP8WeightLinear", "GELU", "FP8WeightLinear"]
    assert model(torch.randn(3, 8)).shape == (3, 4)
