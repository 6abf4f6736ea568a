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


def test_fp8_config_grammar() -> None:
    import pytest

    from sd35trt.bench import fp8_config, inductor_options

    assert fp8_config("fp8") == (None, set())
    assert fp8_config("fp8-compile-reduce-overhead+fast+gelu") == ("reduce-overhead", {"fast", "gelu"})
    assert inductor_options("reduce-overhead", tune=True) == {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
    for bad in ("fp8+turbo", "fp8-fast", "fp8-compile-default+fast+x"):
        with pytest.raises(ValueError, match=bad.replace("+", r"\+")):
            fp8_config(bad)


def test_flags_switch_the_model_and_back() -> None:
    from sd35trt.bench import set_fp8_options
    from sd35trt.runtime.models.fp8 import FP8Linear, max_calibrate, to_fp8
    from sd35trt.runtime.models.fp8_attention import FP8Attention
    from sd35trt.runtime.models.mmdit import FeedForward, gelu_tanh, gelu_tanh_sigmoid, sdpa

    config = VariantConfig("tiny", "large", TINY_TRANSFORMERS["large"])
    model = random_mmdit(config, torch.float32, "cpu")
    args = (torch.randn(2, 16, 8, 8), torch.tensor([500.0, 500.0]), torch.randn(2, 101, 96), torch.randn(2, 80))
    m8 = to_fp8(model, max_calibrate(model, lambda m: m(*args), ("pos_embed",)))
    cores = lambda: [m.core for m in m8.modules() if hasattr(m, "core")]  # noqa: E731
    set_fp8_options(m8, {"fast", "gelu", "fa8qk"})
    assert all(m.fast_accum for m in m8.modules() if isinstance(m, FP8Linear))
    assert all(isinstance(c, FP8Attention) and not c.pv_fp8 for c in cores())
    assert all(m.act is gelu_tanh_sigmoid for m in m8.modules() if isinstance(m, FeedForward))
    set_fp8_options(m8, set())
    assert not any(m.fast_accum for m in m8.modules() if isinstance(m, FP8Linear))
    assert all(c is sdpa for c in cores())
    assert all(m.act is gelu_tanh for m in m8.modules() if isinstance(m, FeedForward))
