"""ControlNet generation equals diffusers' StableDiffusion3ControlNetPipeline (torch, fp32, CPU).

Tiny ControlNets in diffusers layout are generated from the tiny Large transformer
(export/tiny_controlnet.py): SD3.5 Large style (image-only blocks, the transformer's patch embedding)
and InstantX style (joint blocks, zero pooled projections, no VAE shift). Same prompt, seed,
latents and control image -> the same `np` image within 1e-4 max abs. The control images' VAE
posterior is sampled from torch's global RNG by diffusers (no generator): both runs are seeded
with torch.manual_seed first and ours leaves control_generator=None.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd35trt.export.tiny_controlnet import write_tiny_controlnet
from sd35trt.runtime import Pipeline

diffusers = pytest.importorskip("diffusers", reason="diffusers (test extra) holds the reference pipeline")

PROMPT = "a red fox in fresh snow, watercolor"
NEGATIVE = "blurry, low quality"
TOL = 1e-4


def picture(h: int, w: int, seed: int) -> Image.Image:
    """A deterministic edge-rich RGB picture (stripes + a disc), h x w."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    a, b = g.uniform(2.0, 6.0, 2)
    disc = ((yy - 0.5) ** 2 + (xx - 0.45) ** 2 < 0.08).astype(np.float64)
    rgb = np.stack([0.5 + 0.5 * np.sign(np.sin(a * 6 * xx)), 0.5 + 0.4 * np.cos(b * 5 * yy), disc], -1)
    return Image.fromarray((rgb.clip(0, 1) * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def nets(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("controlnets")
    large = tiny_models["large"]
    return {"large3": write_tiny_controlnet(large, root / "large3", "large", 3, seed=1),
            "large2": write_tiny_controlnet(large, root / "large2", "large", 2, seed=2),
            "instantx": write_tiny_controlnet(large, root / "instantx", "instantx", 2, seed=3)}


def _reference(model: Path, paths: list[Path]):
    cns = [diffusers.SD3ControlNetModel.from_pretrained(p, dtype=torch.float32) for p in paths]
    cn = cns[0] if len(cns) == 1 else diffusers.SD3MultiControlNetModel(cns)
    pipe = diffusers.StableDiffusion3ControlNetPipeline.from_pretrained(model, controlnet=cn, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pairs(tiny_models: dict[str, Path], nets: dict[str, Path]):
    """(diffusers pipeline, ours) per tuple of ControlNet names, made once per module."""
    made: dict[tuple[str, ...], tuple] = {}

    def get(*names: str):
        if names not in made:
            paths = [nets[n] for n in names]
            ours = Pipeline.from_pretrained(tiny_models["large"], backend="torch", device="cpu", dtype=torch.float32,
                                            controlnet=[str(p) for p in paths] if len(paths) > 1 else str(paths[0]))
            made[names] = (_reference(tiny_models["large"], paths), ours)
        return made[names]

    yield get
    for _, ours in made.values():
        ours.close()


def _run(pipe, seed: int = 7, **kw) -> np.ndarray:
    torch.manual_seed(seed)  # the control posterior's noise (diffusers samples it from the global RNG)
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    if isinstance(pipe, Pipeline):
        kw["progress"] = False
    return pipe(output_type="np", height=64, width=64, num_inference_steps=4, **kw).images


CASES = {  # name: (nets, call arguments)
    "cfg": (["large3"], dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0,
                             controlnet_conditioning_scale=0.8)),
    "no-cfg": (["large3"], dict(prompt=PROMPT, guidance_scale=1.0, controlnet_conditioning_scale=1.3)),
    "batch2": (["large3"], dict(prompt=[PROMPT, "a lighthouse at dusk"], negative_prompt=NEGATIVE,
                                guidance_scale=4.0, controlnet_conditioning_scale=0.6)),
    "window": (["large3"], dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0,
                                control_guidance_start=0.25, control_guidance_end=0.75)),
    "two-nets": (["large3", "large2"], dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0,
                                            controlnet_conditioning_scale=[0.7, 1.1],
                                            control_guidance_start=[0.0, 0.25])),
    "instantx": (["instantx"], dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0,
                                    controlnet_conditioning_scale=0.9)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_controlnet_equals_diffusers(case: str, pairs) -> None:
    names, kw = CASES[case]
    ref, ours = pairs(*names)
    image = picture(64, 64, 0)
    control = [image, picture(64, 64, 1)] if len(names) > 1 else image
    want = _run(ref, control_image=control, **kw)
    got = _run(ours, control_image=control, **kw)
    plain = _run(ours, **{k: v for k, v in kw.items() if not k.startswith("control")})
    assert got.shape == want.shape == (len(kw["prompt"]) if isinstance(kw["prompt"], list) else 1, 64, 64, 3)
    err = float(np.abs(got - want).max())
    print(f"{case}: max abs {err:.2e}")
    assert err <= TOL, f"{case}: max abs {err:.2e} vs StableDiffusion3ControlNetPipeline"
    assert float(np.abs(got - plain).max()) > 1e-2, f"{case}: the ControlNet did not change the image"


def test_scale_changes_image_and_zero_scale_is_plain(pairs) -> None:
    ref, ours = pairs("large3")
    kw = dict(prompt=PROMPT, guidance_scale=1.0, control_image=picture(64, 64, 0))
    zero_ref = _run(ref, controlnet_conditioning_scale=0.0, **kw)
    zero = _run(ours, controlnet_conditioning_scale=0.0, **kw)  # the ControlNet is skipped
    strong = _run(ours, controlnet_conditioning_scale=2.0, **kw)
    assert float(np.abs(zero - zero_ref).max()) <= TOL
    assert float(np.abs(strong - zero).max()) > 1e-2


def test_image_to_image_with_controlnet(pairs) -> None:
    """Image-to-image at strength 1 from given latents starts from them as they are, so with a
    ControlNet it equals diffusers' ControlNet pipeline from the same latents; at strength 0.6 the
    ControlNet still changes the edited image."""
    ref, ours = pairs("large3")
    latents = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(5))  # [1, 16, 8, 8]
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, control_image=picture(64, 64, 0))
    want = _run(ref, latents=latents, **kw)
    got = _run(ours, latents=latents, image=picture(64, 64, 3), strength=1.0, **kw)
    edit = _run(ours, image=picture(64, 64, 3), strength=0.6, **kw)
    edit_plain = _run(ours, image=picture(64, 64, 3), strength=0.6, prompt=PROMPT, negative_prompt=NEGATIVE,
                      guidance_scale=5.0)
    assert float(np.abs(got - want).max()) <= TOL
    assert float(np.abs(edit - edit_plain).max()) > 1e-2
