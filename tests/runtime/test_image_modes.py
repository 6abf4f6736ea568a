"""Image-to-image, inpainting and skip-layer guidance equal diffusers' pipelines (torch, fp32, CPU).

References, built from the same tiny folder: StableDiffusion3Img2ImgPipeline,
StableDiffusion3InpaintPipeline, StableDiffusion3Pipeline(skip_guidance_layers=...). Same prompt,
seed, size, steps, guidance, strength -> the same `np` image within 1e-4 max abs. diffusers 0.42's
inpainting decodes `latents / scaling_factor` without adding the VAE's shift_factor (its
text-to-image and image-to-image add it); ours adds it everywhere, so inpainting is compared on
the final latents and on those latents decoded as the other two pipelines decode them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd35trt.runtime import InvalidInputError, Pipeline

diffusers = pytest.importorskip("diffusers", reason="diffusers (test extra) holds the reference pipelines")

PROMPT = "a red fox in fresh snow, watercolor"
NEGATIVE = "blurry, low quality"


def _picture(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth deterministic RGB picture [h, w, 3] in [0, 1] (gradients + a disc)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    a, b, c = g.uniform(0.5, 3.0, 3)
    disc = ((yy - 0.5) ** 2 + (xx - 0.4) ** 2 < 0.06).astype(np.float64)
    rgb = np.stack([0.5 + 0.4 * np.sin(a * 6 * xx), 0.5 + 0.4 * np.cos(b * 5 * yy), 0.3 + 0.5 * disc * c / 3], -1)
    return rgb.clip(0, 1).astype(np.float32)


def _pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray((arr * 255).round().astype(np.uint8))


def _mask(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.float32)  # [h, w], 1 = repaint
    m[h // 4 : 3 * h // 4, w // 3 : w - 4] = 1.0
    return m


def _load(folder: Path):
    kw = dict(torch_dtype=torch.float32)
    refs = {"img2img": diffusers.StableDiffusion3Img2ImgPipeline.from_pretrained(folder, **kw),
            "inpaint": diffusers.StableDiffusion3InpaintPipeline.from_pretrained(folder, **kw),
            "t2i": diffusers.StableDiffusion3Pipeline.from_pretrained(folder, **kw)}
    for r in refs.values():
        r.set_progress_bar_config(disable=True)
    return refs, Pipeline.from_pretrained(folder, backend="torch", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def family_pipes(tiny_models: dict[str, Path]):
    """family -> (diffusers references, our torch pipeline), loaded on first use."""
    loaded: dict[str, tuple] = {}

    def get(family: str):
        if family not in loaded:
            loaded[family] = _load(tiny_models[family])
        return loaded[family]

    yield get
    for _, ours in loaded.values():
        ours.close()


@pytest.fixture(scope="module")
def pipes(family_pipes):
    return family_pipes("medium")


def _inputs(kind: str, h: int, w: int, n: int = 1):
    """Source image(s) of another size than the output (so the resize is exercised) and masks."""
    pics = [_picture(h + 16, w + 8, seed) for seed in range(n)]
    masks = [_mask(h + 16, w + 8) for _ in range(n)]
    if kind == "pil":
        return [_pil(p) for p in pics], [_pil(np.repeat(m[..., None], 3, -1)) for m in masks]
    return np.stack(pics), np.stack(masks)[..., None]  # [n, H, W, 3], [n, H, W, 1]


def _gen(seed: int, n: int | None):
    return torch.Generator().manual_seed(seed) if n is None else [torch.Generator().manual_seed(seed + i) for i in range(n)]


# (height, width, steps, guidance, strength, input kind, num_images_per_prompt, images, generator list)
CASES = {
    "square-cfg-0.6-pil": (64, 64, 5, 4.0, 0.6, "pil", 1, 1, None),
    "nonsquare-nocfg-0.3-np": (64, 96, 10, 1.0, 0.3, "np", 1, 1, None),
    "batch2-cfg-1.0-pil": (64, 64, 4, 3.5, 1.0, "pil", 2, 1, None),
    "batch2-lists-0.6-np": (64, 96, 5, 3.0, 0.6, "np", 1, 2, 2),
}


def _run(pipes, mode: str, case: str, output_type: str = "np"):
    refs, ours = pipes
    h, w, steps, g, strength, kind, per, n_img, n_gen = CASES[case]
    images, masks = _inputs(kind, h, w, n_img)
    prompt = PROMPT if n_img == 1 else [PROMPT, "a lighthouse at dusk"]
    image = images[0] if kind == "pil" and n_img == 1 else images
    mask = (masks[0] if kind == "pil" and n_img == 1 else masks) if mode == "inpaint" else None
    common = dict(prompt=prompt, negative_prompt=NEGATIVE, height=h, width=w, num_inference_steps=steps,
                  guidance_scale=g, strength=strength, num_images_per_prompt=per, image=image, output_type=output_type)
    if mask is not None:
        common["mask_image"] = mask
    a = refs[mode](generator=_gen(7, n_gen), **common).images
    b = ours(generator=_gen(7, n_gen), progress=False, **common).images
    return a, b, per * n_img


# Large and Large Turbo (other block layouts and defaults): one CFG and one no-CFG case each.
FAMILY_CASES = [("medium", c) for c in sorted(CASES)] + [("large", "square-cfg-0.6-pil"),
                                                         ("turbo", "nonsquare-nocfg-0.3-np")]


@pytest.mark.parametrize("family,case", FAMILY_CASES)
def test_image_to_image_matches_diffusers(family_pipes, family: str, case: str) -> None:
    a, b, n = _run(family_pipes(family), "img2img", case)
    h, w = CASES[case][:2]
    assert a.shape == b.shape == (n, h, w, 3)
    assert np.abs(a - b).max() <= 1e-4
    assert a.std() > 0.02


def _decode(ref, latents: torch.Tensor) -> np.ndarray:
    """diffusers' VAE decode and postprocess, with the shift its other pipelines add."""
    vae = ref.vae.config
    with torch.no_grad():
        image = ref.vae.decode(latents / vae.scaling_factor + vae.shift_factor, return_dict=False)[0]
    return ref.image_processor.postprocess(image, output_type="np")


@pytest.mark.parametrize("family,case", FAMILY_CASES[:-2] + [("large", "nonsquare-nocfg-0.3-np"),
                                                             ("turbo", "square-cfg-0.6-pil")])
def test_inpainting_matches_diffusers(family_pipes, family: str, case: str) -> None:
    pipes = family_pipes(family)
    a, b, n = _run(pipes, "inpaint", case, output_type="latent")
    h, w = CASES[case][:2]
    assert a.shape == b.shape == (n, 16, h // 8, w // 8)
    assert (a - b).abs().max().item() <= 1e-4
    image = pipes[1]._decode(b, pipes[1].check_request(PROMPT, height=h, width=w, output_type="np"))
    assert np.abs(_decode(pipes[0]["inpaint"], a) - image).max() <= 1e-4


def test_inpainting_keeps_the_unmasked_image(pipes) -> None:
    """Outside the mask the final latents are the image's sampled posterior itself (the blend's
    last step), drawn first from the generator: a wrong blend or generator order fails this."""
    refs, ours = pipes
    pic, m = _picture(64, 64, 3), _mask(64, 64)
    out = ours(PROMPT, image=pic, mask_image=m, height=64, width=64, num_inference_steps=4, strength=1.0,
               generator=_gen(1, None), output_type="latent", progress=False).images
    moments = ours.backend.vae_encoder(torch.from_numpy(pic).permute(2, 0, 1)[None] * 2 - 1)  # [1, 32, 8, 8]
    mean, logvar = moments.chunk(2, dim=1)
    z = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn(mean.shape, generator=_gen(1, None))
    vae = ours.config.vae
    keep = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(8, 8)) < 0.5  # [1, 1, 8, 8]
    diff = (out - (z - vae.shift_factor) * vae.scaling_factor).abs()  # [1, 16, 8, 8]
    assert (diff * keep).max().item() <= 1e-5
    assert (diff * ~keep).max().item() > 0.1  # inside the mask: repainted


# (layers, start, stop, steps)
SLG = {"blocks-1-2": ([1, 2], 0.01, 0.5, 8), "block-3-late": ([3], 0.2, 0.8, 10)}


@pytest.mark.parametrize("case", sorted(SLG))
def test_skip_layer_guidance_matches_diffusers(pipes, case: str) -> None:
    refs, ours = pipes
    layers, start, stop, steps = SLG[case]
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=64, width=96, num_inference_steps=steps,
                  guidance_scale=4.0, output_type="np", skip_guidance_layers=layers,
                  skip_layer_guidance_start=start, skip_layer_guidance_stop=stop, skip_layer_guidance_scale=2.8)
    a = refs["t2i"](generator=_gen(3, None), **common).images
    b = ours(generator=_gen(3, None), progress=False, **common).images
    plain = ours(generator=_gen(3, None), progress=False, **{**common, "skip_guidance_layers": None}).images
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(b - plain).max() > 1e-3  # the third pass changed the image


def test_padding_mask_crop_matches_diffusers(pipes) -> None:
    """Crop to the padded mask box, inpaint at height x width, paste back (diffusers' semantics):
    the final latents equal diffusers' (read from its step callback, since its inpainting decodes
    without the VAE shift), the pasted image equals diffusers' apply_overlay of those latents decoded
    the other pipelines' way, and outside the mask the output is the original image."""
    refs, ours = pipes
    pic = _pil(_picture(72, 88, 4))  # 88 wide, 72 high: the box is widened to 96:64's aspect
    m = np.zeros((72, 88), np.float32)
    m[30:44, 50:62] = 1.0
    mask = _pil(np.repeat(m[..., None], 3, -1))
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=64, width=96, num_inference_steps=5,
              guidance_scale=3.0, strength=0.8, image=pic, mask_image=mask, padding_mask_crop=6)
    seen = {}

    def keep(pipe, i, t, kwargs):
        seen["latents"] = kwargs["latents"]
        return {}

    ref = refs["inpaint"](generator=_gen(2, None), callback_on_step_end=keep, output_type="pil", **kw).images
    latents = ours(generator=_gen(2, None), output_type="latent", progress=False, **kw).images
    assert (seen["latents"] - latents).abs().max().item() <= 1e-4
    out = ours(generator=_gen(2, None), output_type="pil", progress=False, **kw).images
    box = refs["inpaint"].mask_processor.get_crop_region(mask, 96, 64, pad=6)
    decoded = refs["inpaint"].image_processor.numpy_to_pil(_decode(refs["inpaint"], seen["latents"]))[0]
    want = np.asarray(refs["inpaint"].image_processor.apply_overlay(mask, pic, decoded, box), np.int16)
    got = np.asarray(out[0], np.int16)
    assert got.shape == want.shape == (72, 88, 3) and ref[0].size == out[0].size
    assert np.abs(got - want).max() <= 1  # uint8 rounding of decodes equal within 1e-4
    outside = m == 0
    assert (got[outside] == np.asarray(pic, np.int16)[outside]).all()
    assert np.abs(got[~outside] - np.asarray(pic, np.int16)[~outside]).mean() > 2  # inside: repainted


@pytest.fixture(scope="module")
def ort_pipe(onnx_fp32: Path):
    p = Pipeline.from_pretrained(onnx_fp32, backend="onnxruntime")
    yield p
    p.close()


def _mode_kwargs(mode: str) -> dict:
    """One request per mode at 64x96, CFG, 4 steps (SLG: block 1 over the whole run)."""
    images, masks = _inputs("np", 64, 96, 1)
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=64, width=96, num_inference_steps=4, guidance_scale=3.0,
              progress=False)
    if mode == "slg":
        return {**kw, "skip_guidance_layers": [1], "skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 1.0}
    kw.update(image=images, strength=0.6)
    return {**kw, "mask_image": masks} if mode == "inpaint" else kw


@pytest.mark.parametrize("mode", ["img2img", "inpaint", "slg"])
def test_onnxruntime_equals_torch(pipes, ort_pipe, mode: str) -> None:
    """The exported graphs: the VAE encoder, and SLG through the transformer's skip_layers input."""
    kw = _mode_kwargs(mode)
    a = pipes[1](generator=_gen(5, None), output_type="np", **kw).images
    b = ort_pipe(generator=_gen(5, None), output_type="np", **kw).images
    assert np.abs(a - b).max() <= 1e-3 and a.std() > 0.02
    if mode == "slg":  # the skip input is live: without it the graph gives another image
        plain = ort_pipe(generator=_gen(5, None), output_type="np", **{**kw, "skip_guidance_layers": None}).images
        assert np.abs(b - plain).max() > 1e-3


@pytest.fixture(scope="module")
def ort_fp8(onnx_fp8: Path):
    p = Pipeline.from_pretrained(onnx_fp8, backend="onnxruntime")
    yield p
    p.close()


@pytest.mark.parametrize("mode", ["img2img", "inpaint", "slg"])
def test_fp8_export_keeps_final_latents(pipes, ort_fp8, mode: str, capsys) -> None:
    """The FP8 export (MMDiT Q/DQ, rest fp32) vs the fp32 torch backend: final-latent cosine >= 0.99."""
    kw = _mode_kwargs(mode)
    a = pipes[1](generator=_gen(6, None), output_type="latent", **kw).images.flatten().double()
    b = ort_fp8(generator=_gen(6, None), output_type="latent", **kw).images.flatten().double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    with capsys.disabled():
        print(f"\n[FP8 export {mode}: final-latent cosine vs fp32 torch {cos:.5f}]")
    assert 0.99 <= cos < 1.0 - 1e-9, cos  # close, and really FP8 (not the fp32 graph)


class Counting:
    """Wraps a real component and counts calls (instrumentation, not a stand-in)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kw):
        self.calls += 1
        return self.fn(*args, **kw)


PIC, MASK = _picture(64, 64, 0), _mask(64, 64)
BAD = [
    (dict(image=PIC, strength=0.0), "strength=0.0"),
    (dict(image=PIC, strength=1.5), "strength=1.5"),
    (dict(image=PIC, strength=1e-17, num_inference_steps=4), "strength=1e-17 leaves 0 of 4"),
    (dict(image=PIC, mask_image=_mask(48, 64)), "mask_image is [(48, 64)]"),
    (dict(image=PIC, mask_image=np.zeros((64, 64), np.float32)), "no pixel >= 0.5"),
    (dict(image=PIC, mask_image=np.stack([MASK] * 3, -1)), "mask_image has shape (64, 64, 3), an RGB(A) array"),
    (dict(image=PIC[..., :2]), "image has shape (64, 64, 2)"),
    (dict(image=(PIC * 255).astype(np.uint8)), "dtype torch.uint8"),
    (dict(image=_pil(PIC).convert("RGBA")), "mode 'RGBA'"),
    (dict(image=[PIC, PIC, PIC], num_images_per_prompt=2), "holds 3 images for a batch of 2"),
    (dict(mask_image=MASK), "mask_image was given without image"),
    (dict(image=PIC, mask_image=MASK, padding_mask_crop=8), "padding_mask_crop needs image as one PIL image"),
    (dict(image=_pil(PIC), padding_mask_crop=8), "padding_mask_crop=8 applies to inpainting"),
    (dict(image=_pil(PIC), mask_image=_pil(MASK), padding_mask_crop=-1), "padding_mask_crop=-1 must be an int"),
    (dict(image=_pil(PIC), mask_image=_pil(_mask(64, 48)), padding_mask_crop=4), "mask_image is 64x48"),
    (dict(skip_guidance_layers=[4]), "skip_guidance_layers=[4]"),
    (dict(skip_guidance_layers=[]), "skip_guidance_layers=[]"),
    (dict(skip_guidance_layers=[1], guidance_scale=1.0), "needs classifier-free guidance"),
    (dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.5, skip_layer_guidance_stop=0.2), "start=0.5"),
]


@pytest.mark.parametrize("kwargs,text", BAD, ids=[t for _, t in BAD])
def test_bad_input_is_refused_before_any_component_runs(pipes, kwargs: dict, text: str) -> None:
    ours = pipes[1]
    counters = {}
    for name in ("clip_l", "clip_g", "t5", "transformer", "vae_decoder", "vae_encoder"):
        counters[name] = Counting(getattr(ours.backend, name))
    saved = {n: getattr(ours.backend, n) for n in counters}
    try:
        for n, c in counters.items():
            setattr(ours.backend, n, c)
        kw = {"guidance_scale": 3.0, **kwargs}
        with pytest.raises(InvalidInputError, match=re.escape(text)):
            ours(PROMPT, height=64, width=64, progress=False, **kw)
    finally:
        for n, f in saved.items():
            setattr(ours.backend, n, f)
    assert all(c.calls == 0 for c in counters.values())
