"""`sd35trt bench --configs modes`: image-to-image, inpainting and skip-layer guidance at real shapes.

Random weights (seeded), one process: the full-size MMDiT in FP8 (`torch-fp8`'s path: max
calibration, fast accumulation, sigmoid-form GELU, the backend's attention choice; eager, so the
SLG pass's block skipping needs no recompile) and the VAE encoder in bf16, channels-last. The
runtime's own pieces drive every mode (`guidance.guided`, `sampling.run`, `edits.start`,
`schedule.trim`), as the pipeline does. Reported:
  * timing: text-to-image denoising (N steps) vs image-to-image at `strength` (one encoder pass +
    the trimmed schedule); diffusers' trim keeps int(N * strength) steps, so the ratio should be
    about that fraction plus the encoder pass;
  * fidelity: each mode's final latents (text-to-image's too), FP8 vs the same model in bf16 (cosine).
The prompt conditioning is random ([negative; positive] context and pooled, seeded): text
encoders cost the same in every mode and are timed by `--configs text`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sd35trt.runtime.config import VariantConfig
from sd35trt.runtime.edits import start as start_from_image
from sd35trt.runtime.guidance import SkipLayerGuidance, guided
from sd35trt.runtime.samplers import EULER
from sd35trt.runtime.sampling import run
from sd35trt.runtime.schedule import flow_match_schedule, trim

MODES = ("text-to-image", "image-to-image", "inpainting", "skip-layer")


@dataclass
class Inputs:
    """One request at real shapes: CFG conditioning, an image, a mask, noise generator seed."""

    context: torch.Tensor  # [2, 77+T, 4096] [negative; positive]
    pooled: torch.Tensor  # [2, 2048]
    image: torch.Tensor  # [1, 3, S, S] in [-1, 1]
    mask: torch.Tensor  # [1, 1, S, S] in {0, 1}, 1 = repaint
    seed: int = 3


def make_inputs(config: VariantConfig, size: int, device: str, seed: int = 11, t5_tokens: int | None = None) -> Inputs:
    g = torch.Generator(device=device).manual_seed(seed)
    ctx = torch.randn(2, config.text_tokens(t5_tokens), config.joint_dim, generator=g, device=device)
    pooled = torch.randn(2, config.pooled_dim, generator=g, device=device)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size, device=device), torch.linspace(-1, 1, size, device=device),
                            indexing="ij")
    image = torch.stack([torch.sin(3 * xx), torch.cos(2 * yy), xx * yy])[None]  # [1, 3, S, S], smooth
    mask = torch.zeros(1, 1, size, size, device=device)
    mask[..., size // 4 : 3 * size // 4, size // 3 : 5 * size // 6] = 1.0
    return Inputs(ctx, pooled, image, mask)


def mode_latents(mode: str, config: VariantConfig, transformer: Callable, encoder: Callable, inputs: Inputs,
                 steps: int, strength: float, slg: SkipLayerGuidance) -> torch.Tensor:
    """The final latents [1, 16, S/8, S/8] of one mode, exactly as the pipeline composes it."""
    device = inputs.context.device
    size = inputs.image.shape[-1]
    shape = config.latent_shape(1, size, size)
    schedule = flow_match_schedule(steps, config.sampling.shift)
    g = torch.Generator(device=device).manual_seed(inputs.seed)
    blend = None
    if mode in ("image-to-image", "inpainting"):
        schedule = trim(schedule, strength)
        mask = inputs.mask if mode == "inpainting" else None
        s = start_from_image(encoder, config.vae, inputs.image, mask, strength, EULER.calls(schedule), shape, g, None,
                             device)
        x, blend = s.latents, s.on_step
    else:
        x = torch.randn(shape, generator=g, device=device)
    guide = slg if mode == "skip-layer" else None
    predict = guided(transformer, inputs.context, inputs.pooled, config.sampling.guidance, guide, len(schedule))
    return run(predict, x, schedule, blend, progress=False)


def callables(model: torch.nn.Module, encoder: torch.nn.Module, attention) -> tuple[Callable, Callable]:
    """The backend-style transformer (bf16 in, fp32 out, under the attention context) and encoder."""

    def transformer(x, t, ctx, pooled, skip_layers=None):
        with attention.context():
            return model(x.bfloat16(), t, ctx.bfloat16(), pooled.bfloat16(), skip_layers=skip_layers).float()

    def encode(pixels: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> moments [B, 32, S/8, S/8]
        return encoder(pixels.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)).float()

    return transformer, encode


def bench_modes(variant: str | VariantConfig, size: int, steps: int, strength: float, runner,
                device: str = "cuda") -> dict[str, float]:
    """Rows: bf16 and FP8 final latents per mode (cosine), then the timing rows; returns the summary."""
    from sd35trt.bench import EXCLUDE, random_init, random_mmdit
    from sd35trt.runtime.config import VARIANTS
    from sd35trt.runtime.models.flash_attention import choose_attention, set_attention_core
    from sd35trt.runtime.models.fp8 import max_calibrate, to_fp8
    from sd35trt.runtime.models.mmdit import use_sigmoid_gelu
    from sd35trt.runtime.models.vae import VaeEncoder

    config = VARIANTS[variant] if isinstance(variant, str) else variant
    inputs = make_inputs(config, size, device)
    model = random_mmdit(config, torch.bfloat16, device)
    with torch.device("meta"):
        enc = VaeEncoder(config.vae)
    enc = random_init(enc, device, 6).to(memory_format=torch.channels_last)
    attention = choose_attention(torch.device(device), torch.bfloat16)
    set_attention_core(model, attention.core)
    slg = SkipLayerGuidance((7, 8, 9))  # Stability's setting for Medium: 1 % .. 20 % of the steps
    summary: dict[str, float] = {}
    with torch.no_grad():
        tf, encode = callables(model, enc, attention)
        refs = {m: mode_latents(m, config, tf, encode, inputs, steps, strength, slg) for m in MODES}
        args = (torch.randn(2, *config.latent_shape(1, size, size)[1:], device=device, dtype=torch.bfloat16),
                torch.full((2,), 700.0, device=device), inputs.context.bfloat16(), inputs.pooled.bfloat16())
        model = to_fp8(model, max_calibrate(model, lambda m: m(*args), EXCLUDE), fast_accum=True)
        use_sigmoid_gelu(model)
        set_attention_core(model, attention.core)
        tf, encode = callables(model, enc, attention)
        for m in MODES:  # text-to-image too: the FP8 error of the plain loop, beside the modes'
            runner.record(f"{m} fp8 final latents", lambda m=m: mode_latents(m, config, tf, encode, inputs, steps,
                                                                              strength, slg), refs[m], warmup=0, iters=1)
            summary[f"cos_{m}"] = runner.rows[-1]["cos_vs_bf16"]
        names = {"t2i": f"text-to-image {steps} steps fp8 [{attention.name}]",
                 "i2i": f"image-to-image strength {strength} fp8", "enc": "vae encoder bf16 ch-last (eager)",
                 "plain": "fp8 step, plain", "skip": "fp8 step, skip_layers input (Where per block)"}
        runner.record(names["t2i"], lambda: mode_latents("text-to-image", config, tf, encode, inputs, steps,
                                                         strength, slg), warmup=1, iters=3)
        runner.record(names["i2i"], lambda: mode_latents("image-to-image", config, tf, encode, inputs, steps,
                                                         strength, slg), warmup=1, iters=3)
        runner.record(names["enc"], lambda: encode(inputs.image), warmup=2, iters=5)
        skip = torch.zeros(config.transformer.num_layers, device=device)  # [L] the exported graphs' skip input
        with attention.context():
            plain = runner.record(names["plain"], lambda: model(*args))
            runner.record(names["skip"], lambda: model(*args, skip), plain)
    ms = {k: next(r["step_ms"] for r in runner.rows if r["name"] == n) for k, n in names.items()}
    kept = len(trim(flow_match_schedule(steps, config.sampling.shift), strength))
    summary.update({f"{k}_ms": v for k, v in ms.items()}, kept_steps=kept, ratio=round(ms["i2i"] / ms["t2i"], 3),
                   expected=round(kept / steps + ms["enc"] / ms["t2i"], 3),
                   skip_input_cost=round(ms["skip"] / ms["plain"], 4))
    print("modes summary:", summary, flush=True)
    return summary
