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
    assert fp8_config("fp8-compile-reduce-overhead+adaln-bank+combo")[1] == {"adaln-bank", "combo"}
    assert inductor_options("reduce-overhead", tune=True) == {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
    for bad in ("fp8+turbo", "fp8-fast", "fp8-compile-default+fast+x"):
        with pytest.raises(ValueError, match=bad.replace("+", r"\+")):
            fp8_config(bad)


def test_flags_switch_the_model_and_back() -> None:
    import pytest

    from sd35trt.bench import set_fp8_options
    from sd35trt.runtime.models.fp8 import FP8Linear, max_calibrate, to_fp8
    from sd35trt.runtime.models.mmdit import FeedForward, gelu_tanh, gelu_tanh_sigmoid, sdpa

    config = VariantConfig("tiny", "large", TINY_TRANSFORMERS["large"])
    model = random_mmdit(config, torch.float32, "cpu")
    args = (torch.randn(2, 16, 8, 8), torch.tensor([500.0, 500.0]), torch.randn(2, 101, 96), torch.randn(2, 80))
    m8 = to_fp8(model, max_calibrate(model, lambda m: m(*args), ("pos_embed",)))
    cores = lambda: [m.core for m in m8.modules() if hasattr(m, "core")]  # noqa: E731
    set_fp8_options(m8, {"fast", "gelu"})
    assert all(m.fast_accum for m in m8.modules() if isinstance(m, FP8Linear))
    assert all(c is sdpa for c in cores())
    assert all(m.act is gelu_tanh_sigmoid for m in m8.modules() if isinstance(m, FeedForward))
    set_fp8_options(m8, set())
    assert not any(m.fast_accum for m in m8.modules() if isinstance(m, FP8Linear))
    assert all(m.act is gelu_tanh for m in m8.modules() if isinstance(m, FeedForward))
    with pytest.raises(RuntimeError, match=r"\+fa4.*device cpu"):  # a row must be what its name says
        set_fp8_options(m8, {"fa4"})
    set_fp8_options(m8, {"adaln-bank"})  # a runtime step fusion (fp8_fusions.py) as a bench flag, and off again
    assert hasattr(m8, "adaln_bank")
    set_fp8_options(m8, set())
    assert not hasattr(m8, "adaln_bank")


def test_e2e_prompts_go_through_the_runtime_prompt_encoder() -> None:
    """bench_e2e assembles SD3 conditioning with runtime.text.PromptEncoder: CLIP-L ++ CLIP-G hidden
    states zero-padded to joint_dim, then T5 tokens; pooled = CLIP-L ++ CLIP-G pooled."""
    import pytest
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from sd35trt.bench_e2e import _Pretokenized, prompt_encoder

    torch.manual_seed(0)
    clip = dict(vocab_size=99, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77)
    enc = {"clip_l": CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=32, **clip)).eval(),
           "clip_g": CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, projection_dim=48, **clip)).eval(),
           "t5": T5EncoderModel(T5Config(vocab_size=99, d_model=96, d_ff=40, d_kv=8, num_layers=1, num_heads=2)).eval()}
    config = VariantConfig("tiny", "large", TINY_TRANSFORMERS["large"], clip_l_dim=32, clip_g_dim=48,
                           max_sequence_length=24)  # tiny: CLIP-L 32 + CLIP-G 48 wide, joint 96
    g = torch.Generator().manual_seed(1)
    ids = {"clip_l": torch.randint(0, 99, (2, 77), generator=g), "clip_g": torch.randint(0, 99, (2, 77), generator=g),
           "t5": torch.randint(0, 99, (2, 24), generator=g)}
    ctx, pooled = prompt_encoder(config, enc, ids)()
    assert ctx.shape == (2, 77 + 24, config.joint_dim) and pooled.shape == (2, 80)
    with torch.no_grad():
        hl = enc["clip_l"](ids["clip_l"], output_hidden_states=True).hidden_states[-2]
        t5 = enc["t5"](ids["t5"])[0]
    assert torch.allclose(ctx[:, :77, :32], hl) and torch.equal(ctx[:, :77, 80:], torch.zeros(2, 77, 16))
    assert torch.allclose(ctx[:, 77:], t5)
    with pytest.raises(ValueError, match="asked for"):
        _Pretokenized(ids["t5"])(["a", "b"], 256)
