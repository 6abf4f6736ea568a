"""Bad input -> InvalidInputError naming the value, raised before any component runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sd35trt.runtime import InvalidInputError, Pipeline


class Counting:
    """Wraps a real component and counts calls (instrumentation, not a stand-in)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


@pytest.fixture(scope="module")
def pipe(tiny_medium: Path):
    p = Pipeline.from_pretrained(tiny_medium, backend="torch", device="cpu", dtype=torch.float32)
    for name in ("clip_l", "clip_g", "t5", "transformer", "vae_decoder"):
        setattr(p.backend, name, Counting(getattr(p.backend, name)))
    return p


NAMES = ("clip_l", "clip_g", "t5", "transformer", "vae_decoder")


def _calls(pipe) -> dict[str, int]:
    return {n: getattr(pipe.backend, n).calls for n in NAMES}


BAD = [
    # (kwargs, text the message must contain)
    (dict(height=100), "height=100"),
    (dict(width=72, height=64), "width=72"),
    (dict(height=1024), "height=1024"),  # tiny positional table covers 512 px
    (dict(width=0), "width=0"),
    (dict(height=64.0), "height=64.0"),
    (dict(num_inference_steps=0), "num_inference_steps=0"),
    (dict(num_inference_steps=-2), "num_inference_steps=-2"),
    (dict(guidance_scale=float("nan")), "guidance_scale=nan"),
    (dict(guidance_scale=float("inf")), "guidance_scale=inf"),
    (dict(guidance_scale=-1.0), "guidance_scale=-1.0"),
    (dict(prompt=[]), "prompt=[]"),
    (dict(prompt=None), "prompt=None"),
    (dict(prompt=["ok", 3]), "prompt=['ok', 3]"),
    (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "negative_prompt has 3 entries"),
    (dict(prompt=["a", "b"], prompt_2=["x"]), "prompt_2 has 1 entries"),
    (dict(generator=[torch.Generator()] * 3), "3 generators"),
    (dict(num_images_per_prompt=2, generator=[torch.Generator()]), "1 generators"),
    (dict(generator="seed"), "generator='seed'"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt=0"),
    (dict(max_sequence_length=1000), "max_sequence_length=1000"),
    (dict(output_type="jpeg"), "output_type='jpeg'"),
    (dict(latents=torch.zeros(1, 16, 4, 4)), "(1, 16, 4, 4)"),
    (dict(latents=torch.full((1, 16, 8, 8), float("nan"))), "NaN"),
    (dict(sigmas=[1.0, float("inf")]), "inf"),
    (dict(sigmas=[1.0, 0.5], num_inference_steps=3), "num_inference_steps=3"),
    (dict(sampler="ddim"), "sampler='ddim' is not one of ('euler', 'dpmpp_2m', 'dpmpp_2m_sde', 'heun')"),
    (dict(sampler="Euler"), "sampler='Euler'"),
    (dict(sampler=None), "sampler=None"),
    (dict(sampler="heun", sigmas=[1.0, 0.5]), "cannot be used with sampler='heun'"),
    (dict(sampler="dpmpp_2m_sde", sigmas=[1.0, 0.5]), "use sampler in ['euler']"),
]


def test_the_call_counters_count_a_good_request(pipe) -> None:
    """Positive control for the test below: a valid request goes through every counted component."""
    before = _calls(pipe)
    pipe("a cat", height=64, width=64, num_inference_steps=2, guidance_scale=3.0, progress=False)
    ran = {n: c - before[n] for n, c in _calls(pipe).items()}
    assert ran == {"clip_l": 1, "clip_g": 1, "t5": 1, "transformer": 2, "vae_decoder": 1}  # CFG: one batch of 2 per step


@pytest.mark.parametrize("kwargs,needle", BAD, ids=[n for _, n in BAD])
def test_bad_input_raises_naming_the_value_and_calls_no_component(pipe, kwargs: dict, needle: str) -> None:
    kwargs = {"prompt": "a cat", "height": 64, "width": 64, **kwargs}
    before = _calls(pipe)
    with pytest.raises(InvalidInputError) as info:
        pipe(progress=False, **kwargs)
    assert needle in str(info.value)
    assert _calls(pipe) == before


def test_error_suggests_valid_sizes(pipe) -> None:
    with pytest.raises(InvalidInputError, match="use 96 or 112"):
        pipe("a cat", height=100, width=64, progress=False)


def test_bad_input_is_a_value_error(pipe) -> None:
    # typed, but still catchable as ValueError by callers that expect diffusers' behaviour
    with pytest.raises(ValueError):
        pipe("a cat", num_inference_steps=0, progress=False)
