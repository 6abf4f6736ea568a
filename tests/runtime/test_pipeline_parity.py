"""Parity: our Pipeline (torch backend, fp32) reproduces diffusers' StableDiffusion3Pipeline.

Same tiny checkpoint, prompt, negative prompt, seed, size, steps and guidance -> the same `np`
image within 1e-4 max abs (seen: <= 4e-6).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sd35trt.runtime import Pipeline

diffusers = pytest.importorskip("diffusers", reason="diffusers (test extra) is the reference pipeline")

PROMPT = 'a neon sign that says "OPEN 24 HOURS" above a rainy street, 35mm photo'
NEGATIVE = "blurry, low quality"
# (kwargs for both pipelines, defaults the reference needs spelled out)
CASES = {
    "square-cfg": dict(height=128, width=128, num_inference_steps=6, guidance_scale=4.0),
    "nonsquare-nocfg": dict(height=96, width=160, num_inference_steps=5, guidance_scale=1.0),
    "batch2-cfg": dict(height=64, width=112, num_inference_steps=4, guidance_scale=3.5, num_images_per_prompt=2),
    "custom-sigmas": dict(height=80, width=80, sigmas=[1.0, 0.8, 0.55, 0.3, 0.1], guidance_scale=2.0),
}
DEFAULTS = {"medium": (40, 4.5), "large": (28, 3.5), "turbo": (4, 0.0)}


@pytest.fixture(scope="module")
def pipes(tiny_models: dict[str, Path]):
    out = {}
    for variant, path in tiny_models.items():
        ref = diffusers.StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=torch.float32)
        ref.set_progress_bar_config(disable=True)
        ours = Pipeline.from_pretrained(path, backend="torch", device="cpu", dtype=torch.float32)
        out[variant] = (ref, ours)
    return out


def _both(pipes, variant: str, seed: int = 1234, ref_extra: dict | None = None, **kw):
    ref, ours = pipes[variant]
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, output_type="np", **kw)
    a = ref(generator=torch.Generator().manual_seed(seed), **common, **(ref_extra or {})).images
    b = ours(generator=torch.Generator().manual_seed(seed), progress=False, **common).images
    return np.asarray(a), np.asarray(b)


@pytest.mark.parametrize("variant", ["medium", "large", "turbo"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_image_matches_diffusers(pipes, variant: str, case: str) -> None:
    a, b = _both(pipes, variant, **CASES[case])
    n = CASES[case].get("num_images_per_prompt", 1)
    assert a.shape == b.shape == (n, CASES[case]["height"], CASES[case]["width"], 3)
    assert np.abs(a - b).max() <= 1e-4
    assert 0.02 < a.std() and 0.0 <= b.min() and b.max() <= 1.0  # a real image, not a flat one


@pytest.mark.parametrize("variant", ["medium", "large", "turbo"])
def test_variant_defaults_match_diffusers(pipes, variant: str) -> None:
    steps, guidance = DEFAULTS[variant]
    a, b = _both(pipes, variant, ref_extra=dict(num_inference_steps=steps, guidance_scale=guidance))
    assert a.shape == b.shape == (1, 128, 128, 3)
    assert np.abs(a - b).max() <= 1e-4


def test_prompt_lists_and_generator_lists(pipes) -> None:
    ref, ours = pipes["medium"]
    kw = dict(prompt=["a red cube", "a blue sphere"], negative_prompt=["ugly", "dark"],
              prompt_3=["cube, t5", "sphere, t5"], height=64, width=64, num_inference_steps=3,
              guidance_scale=5.0, output_type="np")
    gens = lambda: [torch.Generator().manual_seed(s) for s in (7, 8)]  # noqa: E731
    a = ref(generator=gens(), **kw).images
    b = ours(generator=gens(), progress=False, **kw).images
    assert np.abs(a - b).max() <= 1e-4
    # per-image generators make image 2 independent of image 1's seed
    single = ours(**{**kw, "prompt": ["a blue sphere"], "negative_prompt": ["dark"], "prompt_3": ["sphere, t5"]},
                  generator=[torch.Generator().manual_seed(8)], progress=False).images
    assert np.abs(single[0] - b[1]).max() <= 1e-4


def test_latent_output_and_given_latents(pipes) -> None:
    ref, ours = pipes["large"]
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    kw = dict(prompt=PROMPT, height=64, width=64, num_inference_steps=3, guidance_scale=2.0, output_type="latent")
    a = ref(latents=latents.clone(), **kw).images
    b = ours(latents=latents.clone(), progress=False, **kw).images
    assert a.shape == b.shape == (1, 16, 8, 8)
    assert (a - b).abs().max().item() <= 1e-4


def test_without_t5_matches_diffusers_without_t5(tiny_models: dict[str, Path]) -> None:
    path = tiny_models["medium"]
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(
        path, text_encoder_3=None, tokenizer_3=None, torch_dtype=torch.float32
    )
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained(path, device="cpu", dtype=torch.float32, load_t5=False)
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=64, width=64, num_inference_steps=4,
              guidance_scale=4.5, max_sequence_length=32, output_type="np")
    a = ref(generator=torch.Generator().manual_seed(3), **kw).images
    b = ours(generator=torch.Generator().manual_seed(3), progress=False, **kw).images
    assert np.abs(a - b).max() <= 1e-4
