"""The image-modes bench on the CPU with a tiny checkpoint: each mode's latents are the pipeline's
(same composition: the runtime's start, blend, guidance and loop), its calibration covers every
call of whole denoising runs of other requests, and the FP8 model it times stays close to bf16
(cosine >= 0.99) in every mode."""

from __future__ import annotations

import copy
import dataclasses

from pathlib import Path

import pytest
import torch

from sd35trt.bench import EXCLUDE
from sd35trt.bench_modes import CALIB_SEEDS, MODES, calibrate_on_runs, callables, make_inputs, mode_latents
from sd35trt.runtime import Pipeline
from sd35trt.runtime.checkpoint import Checkpoint
from sd35trt.runtime.guidance import SkipLayerGuidance
from sd35trt.runtime.models.flash_attention import choose_attention
from sd35trt.runtime.models.fp8 import max_calibrate, to_fp8
from sd35trt.runtime.models.loader import load_modules


@pytest.fixture(scope="module")
def tiny(tiny_medium: Path):
    ckpt = Checkpoint.open(tiny_medium)
    mods = load_modules(ckpt, ["transformer", "vae_encoder"], torch.device("cpu"), torch.bfloat16)
    return ckpt.config, mods, make_inputs(ckpt.config, 32, "cpu", t5_tokens=16)


def test_modes_are_what_the_pipeline_runs(tiny, tiny_medium: Path) -> None:
    """mode_latents == Pipeline (torch, fp32) given the same conditioning: checked through the
    pipeline's own transformer and encoder callables on the pipeline's prompt embeddings."""
    config, _, inputs = tiny
    pipe = Pipeline.from_pretrained(tiny_medium, device="cpu", dtype=torch.float32)
    ctx, pooled = pipe.encode(["", "a fox"], ["", "a fox"], ["", "a fox"], 16)  # [2, 77+16, C], [2, 2048]
    inputs = dataclasses.replace(inputs, context=ctx, pooled=pooled)
    image = (inputs.image[0].permute(1, 2, 0).numpy() + 1) / 2  # [S, S, 3] in [0, 1]
    slg = SkipLayerGuidance((1,), start=0.0, stop=1.0)
    kw = dict(prompt="a fox", negative_prompt="", height=32, width=32, num_inference_steps=4, output_type="latent",
              max_sequence_length=16, progress=False)
    extra = {"text-to-image": {}, "image-to-image": dict(image=image, strength=0.6), "skip-layer": dict(
        skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0),
        "inpainting": dict(image=image, mask_image=inputs.mask[0, 0].numpy(), strength=0.6)}
    b = pipe.backend
    for mode in MODES:
        ours = mode_latents(mode, config, b.transformer, b.vae_encoder, inputs, 4, 0.6, slg)
        want = pipe(generator=torch.Generator().manual_seed(inputs.seed), **kw, **extra[mode]).images
        assert (ours - want).abs().max().item() <= 1e-4, mode


def test_fp8_stays_close_to_bf16_in_every_mode(tiny) -> None:
    config, mods, inputs = tiny
    model, enc = mods["transformer"], mods["vae_encoder"]
    attention = choose_attention(torch.device("cpu"), torch.bfloat16)
    slg = SkipLayerGuidance((1,), start=0.0, stop=1.0)
    tf, encode = callables(model, enc, attention)
    refs = {m: mode_latents(m, config, tf, encode, inputs, 3, 0.7, slg) for m in MODES}  # 3 steps, 2 kept
    amax = calibrate_on_runs(model, config, tf, encode, 32, 3, 0.7, slg, t5_tokens=16)  # the bench's calibration
    fp8 = to_fp8(copy.deepcopy(model), amax)
    tf, encode = callables(fp8, enc, attention)
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))  # noqa: E731
    for m in MODES:
        got = mode_latents(m, config, tf, encode, inputs, 3, 0.7, slg)
        assert 0.99 <= cos(got, refs[m]) < 1.0, (m, cos(got, refs[m]))
    assert cos(refs["image-to-image"], refs["text-to-image"]) < 0.99  # the modes really differ
    assert cos(refs["skip-layer"], refs["text-to-image"]) < 0.9999


def test_calibration_covers_every_call_of_whole_runs_of_other_requests(tiny) -> None:
    """A 3-step run's calibration contains its first call (= the whole 1-step run: same noise,
    sigma 1, conditioning) and later calls raise some scales; the measured request is not used."""
    config, mods, inputs = tiny
    model, enc = mods["transformer"], mods["vae_encoder"]
    tf, encode = callables(model, enc, choose_attention(torch.device("cpu"), torch.bfloat16))
    slg = SkipLayerGuidance((1,))
    run = lambda steps, seeds=CALIB_SEEDS: calibrate_on_runs(model, config, tf, encode, 32, steps, 0.7, slg,  # noqa: E731
                                                             seeds=seeds, t5_tokens=16)
    one, three = run(1), run(3)
    assert set(one) == set(three) == set(max_calibrate(model, lambda m: None, EXCLUDE)) | {
        k.replace("weight", "input") for k in one if k.endswith("weight_quantizer")}
    assert all(three[k] >= one[k] for k in one) and any(three[k] > one[k] for k in one)
    measured = max_calibrate(model, lambda m: mode_latents("text-to-image", config, tf, encode, inputs, 3, 0.7, slg),
                             EXCLUDE)
    assert run(3, seeds=CALIB_SEEDS[:1]) != measured  # other conditioning and noise than the measured request
    assert run(3, seeds=CALIB_SEEDS[:1]) == run(3, seeds=CALIB_SEEDS[:1])  # seeded
