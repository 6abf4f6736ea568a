"""Pipeline behaviour beyond parity: callbacks, cancellation, NaN detection, detection from configs."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from sd35trt.runtime import (
    CheckpointError,
    GenerationCancelled,
    InvalidInputError,
    NonFiniteLatentsError,
    Pipeline,
)

KW = dict(prompt="a lighthouse at dusk", height=64, width=64, num_inference_steps=4, guidance_scale=3.0)


@pytest.fixture(scope="module")
def pipe(tiny_medium: Path) -> Pipeline:
    return Pipeline.from_pretrained(tiny_medium, backend="torch", device="cpu", dtype=torch.float32)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_callback_sees_every_step_and_can_replace_latents(pipe) -> None:
    seen = []

    def cb(p, i, t, kw):
        seen.append((i, t, tuple(kw["latents"].shape)))
        return {"latents": kw["latents"] * 0} if i == 3 else {}

    out = pipe(**KW, generator=_gen(), output_type="latent", callback_on_step_end=cb, progress=False)
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert seen[0][1] == 1000.0 and seen[0][2] == (1, 16, 8, 8)
    assert out.images.abs().max().item() == 0.0


def test_callback_can_cancel(pipe) -> None:
    with pytest.raises(GenerationCancelled) as info:
        pipe(**KW, generator=_gen(), callback_on_step_end=lambda p, i, t, kw: {"cancel": i == 1}, progress=False)
    assert info.value.step == 1


def test_nan_injected_mid_loop_names_the_step(pipe) -> None:
    def poison(p, i, t, kw):
        return {"latents": kw["latents"] * float("nan")} if i == 2 else {}

    with pytest.raises(NonFiniteLatentsError, match="step 2") as info:
        pipe(**KW, generator=_gen(), callback_on_step_end=poison, progress=False)
    assert info.value.step == 2


def test_overflowing_latents_fail_at_step_0_not_a_black_image(pipe) -> None:
    huge = torch.full((1, 16, 8, 8), 3e38)  # finite input that overflows inside the model
    with pytest.raises(NonFiniteLatentsError, match="step 0"):
        pipe(**KW, latents=huge, progress=False)


def test_same_seed_same_image_and_seed_matters(pipe) -> None:
    a = pipe(**KW, generator=_gen(1), output_type="np", progress=False).images
    b = pipe(**KW, generator=_gen(1), output_type="np", progress=False).images
    c = pipe(**KW, generator=_gen(2), output_type="np", progress=False).images
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 0.05


def test_pil_output(pipe) -> None:
    img = pipe(**{**KW, "width": 96}, generator=_gen(), progress=False).images[0]
    assert img.size == (96, 64) and img.mode == "RGB"


def test_threads_share_one_pipeline(pipe) -> None:
    expected = {s: pipe(**KW, generator=_gen(s), output_type="np", progress=False).images for s in range(3)}
    got: dict[int, np.ndarray] = {}

    def run(seed: int) -> None:
        got[seed] = pipe(**KW, generator=_gen(seed), output_type="np", progress=False).images

    threads = [threading.Thread(target=run, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in range(3):
        assert np.abs(got[s] - expected[s]).max() <= 1e-6


def test_family_comes_from_configs_not_the_folder_name(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    # a medium checkpoint in a folder named like Large is still medium (dual attention in config)
    fake = tmp_path / "sd3.5_large"
    shutil.copytree(tiny_models["medium"], fake)
    p = Pipeline.from_pretrained(fake, device="cpu")
    assert p.config.family == "medium" and p.config.sampling.steps == 40
    assert Pipeline.from_pretrained(tiny_models["turbo"], device="cpu").config.sampling.steps == 4
    assert Pipeline.from_pretrained(tiny_models["large"], device="cpu").config.sampling.guidance == 3.5


def test_missing_component_is_a_checkpoint_error(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["large"], broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(CheckpointError, match="transformer"):
        Pipeline.from_pretrained(broken, device="cpu")
    with pytest.raises(CheckpointError, match="not a folder"):
        Pipeline.from_pretrained(tmp_path / "nope")


def test_pickle_weights_are_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "pickled"
    shutil.copytree(tiny_models["large"], bad)
    st = bad / "transformer" / "diffusion_pytorch_model.safetensors"
    st.rename(st.with_suffix(".bin"))
    with pytest.raises(CheckpointError, match="pickle"):
        Pipeline.from_pretrained(bad, device="cpu")


def test_without_t5_uses_zeros(tiny_models: dict[str, Path]) -> None:
    p = Pipeline.from_pretrained(tiny_models["large"], device="cpu", load_t5=False)
    assert p.backend.t5 is None
    ctx, pooled = p.encode(["a"], ["a"], ["a"], 16)
    assert ctx.shape == (1, 77 + 16, 96) and pooled.shape == (1, 80)
    assert ctx[:, 77:].abs().max().item() == 0.0


def test_unknown_backend(tiny_medium: Path) -> None:
    with pytest.raises(InvalidInputError, match="backend='nope'"):
        Pipeline.from_pretrained(tiny_medium, backend="nope")


def test_extreme_guidance_fails_loudly_not_a_black_image(pipe) -> None:
    from sd35trt.runtime import NonFiniteImageError, NonFiniteLatentsError

    # finite latents so large that the VAE decodes them into NaN: an error, never a black PNG
    with pytest.raises((NonFiniteImageError, NonFiniteLatentsError), match="backend 'torch'"):
        pipe(**{**KW, "guidance_scale": 1e38}, generator=_gen(), progress=False)
