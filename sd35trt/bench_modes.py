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

Calibration is what `sd35trt export --precision fp8` does (export/calibrate.py): the max |x| of
every Linear input over every transformer call of whole denoising runs (CFG, all steps) of
calibration requests that are not the measured one (their own conditioning and noise seeds),
here with `max_calibrate` (ModelOpt's max statistic) instead of ModelOpt. A control row gives
bf16 vs fp32 on the same weights: how far the reference itself is from exact.
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
CALIB_SEEDS = (101, 102)  # calibration requests: conditioning seeds (noise: +100); the measured one is 11


@dataclass
class Inputs:
    """One request at real shapes: CFG conditioning, an image, a mask, noise generator seed."""

    context: torch.Tensor  # [2, 77+T, 4096] [negative; positive]
    pooled: torch.Tensor  # [2, 2048]
    image: torch.Tensor  # [1, 3, S, S] in [-1, 1]
    mask: torch.Tensor  # [1, 1, S, S] in {0, 1}, 1 = repaint
    seed: int = 3


def make_inputs(config: VariantConfig, size: int, device: str, seed: int = 11, t5_tokens: int | None = None,
                noise_seed: int = 3) -> Inputs:
    g = torch.Generator(device=device).manual_seed(seed)
    ctx = torch.randn(2, config.text_tokens(t5_tokens), config.joint_dim, generator=g, device=device)
    pooled = torch.randn(2, config.pooled_dim, generator=g, device=device)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size, device=device), torch.linspace(-1, 1, size, device=device),
                            indexing="ij")
    image = torch.stack([torch.sin(3 * xx), torch.cos(2 * yy), xx * yy])[None]  # [1, 3, S, S], smooth
    mask = torch.zeros(1, 1, size, size, device=device)
    mask[..., size // 4 : 3 * size // 4, size // 3 : 5 * size // 6] = 1.0
    return Inputs(ctx, pooled, image, mask, noise_seed)


def calibrate_on_runs(model: torch.nn.Module, config: VariantConfig, transformer: Callable, encoder: Callable,
                      size: int, steps: int, strength: float, slg: SkipLayerGuidance,
                      modes: tuple[str, ...] = ("text-to-image",), seeds: tuple[int, ...] = CALIB_SEEDS,
                      t5_tokens: int | None = None) -> dict[str, float]:
    """amax per quantizer of `model` (which `transformer` runs): max |x| over every transformer call
    of whole denoising runs of `modes`, one request per seed (its own conditioning, noise and a
    mirrored image), as export/calibrate.py collects over the calibration prompts."""
    from sd35trt.bench import EXCLUDE
    from sd35trt.runtime.models.fp8 import max_calibrate

    device = str(next(model.parameters()).device)
    requests = [make_inputs(config, size, device, seed=s, t5_tokens=t5_tokens, noise_seed=s + 100) for s in seeds]

    def loop(_model: torch.nn.Module) -> None:
        for r in requests:
            r.image = r.image.flip(-1)  # [1, 3, S, S] not the measured image
            for m in modes:
                mode_latents(m, config, transformer, encoder, r, steps, strength, slg)

    return max_calibrate(model, loop, EXCLUDE)


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


def record_once(runner, name: str, fn: Callable[[], torch.Tensor], ref: torch.Tensor) -> torch.Tensor:
    """One call of `fn`, timed (synchronised wall clock) and compared with `ref`, as a runner row."""
    import json
    import time

    from sd35trt.bench import fidelity, sync

    sync()
    if ref.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    y = fn()
    sync()
    ms = (time.perf_counter() - t0) * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if ref.is_cuda else 0.0
    row = {"name": name, "step_ms": round(ms, 2), "first_call_s": round(ms / 1e3, 1), "peak_gib": round(peak, 2),
           **fidelity(y, ref)}
    runner.rows.append(row)
    print(json.dumps(row), flush=True)
    runner.out.write_text(json.dumps(runner.rows, indent=1))
    return y


def control_rows(exact: torch.nn.Module, config: VariantConfig, encode: Callable, inputs: Inputs, steps: int,
                 strength: float, slg: SkipLayerGuidance, refs: dict[str, torch.Tensor], runner,
                 modes: tuple[str, ...]) -> None:
    """The control: the same weights in fp32 (plain SDPA, fp32 matmuls) vs the bf16 reference."""
    from sd35trt.runtime.models.flash_attention import set_attention_core
    from sd35trt.runtime.models.mmdit import sdpa

    device = inputs.context.device
    model = exact.to(device, torch.float32)
    set_attention_core(model, sdpa)

    def transformer(x, t, ctx, pooled, skip_layers=None):
        return model(x.float(), t, ctx.float(), pooled.float(), skip_layers=skip_layers)

    for m in modes:
        record_once(runner, f"{m} fp32 final latents (control: bf16 vs fp32)",
                    lambda m=m: mode_latents(m, config, transformer, encode, inputs, steps, strength, slg), refs[m])


def bench_modes(variant: str | VariantConfig, size: int, steps: int, strength: float, runner,
                device: str = "cuda", slg_layers: tuple[int, ...] = (7, 8, 9), t5_tokens: int | None = None,
                calib_steps: int | None = None, control: tuple[str, ...] = ("text-to-image",),
                ) -> dict[str, float]:
    """Rows: FP8 vs bf16 final latents per mode (cosine; FP8 calibrated over whole denoising runs of
    other requests at `calib_steps`, the export's default: the variant's steps), the timing rows,
    then the fp32 control for `control`; returns the summary."""
    import copy

    from sd35trt.bench import random_init, random_mmdit
    from sd35trt.runtime.config import VARIANTS
    from sd35trt.runtime.models.flash_attention import choose_attention, set_attention_core
    from sd35trt.runtime.models.fp8 import to_fp8
    from sd35trt.runtime.models.mmdit import use_sigmoid_gelu
    from sd35trt.runtime.models.vae import VaeEncoder

    config = VARIANTS[variant] if isinstance(variant, str) else variant
    inputs = make_inputs(config, size, device, t5_tokens=t5_tokens)
    model = random_mmdit(config, torch.bfloat16, device)
    with torch.device("meta"):
        enc = VaeEncoder(config.vae)
    enc = random_init(enc, device, 6).to(memory_format=torch.channels_last)
    attention = choose_attention(torch.device(device), torch.bfloat16)
    set_attention_core(model, attention.core)
    slg = SkipLayerGuidance(slg_layers)  # Stability's setting for Medium: 7, 8, 9 over 1 % .. 20 % of the steps
    calib_steps = calib_steps or config.sampling.steps
    summary: dict[str, float] = {"calib_requests": len(CALIB_SEEDS), "calib_steps": calib_steps}
    lat = lambda m, tf, enc_: mode_latents(m, config, tf, enc_, inputs, steps, strength, slg)  # noqa: E731
    with torch.no_grad():
        tf, encode = callables(model, enc, attention)
        refs = {m: lat(m, tf, encode) for m in MODES}
        amax = calibrate_on_runs(model, config, tf, encode, size, calib_steps, strength, slg, t5_tokens=t5_tokens)
        exact = copy.deepcopy(model).cpu() if control else None  # bf16 weights for the fp32 control
        args = (torch.randn(2, *config.latent_shape(1, size, size)[1:], device=device, dtype=torch.bfloat16),
                torch.full((2,), 700.0, device=device), inputs.context.bfloat16(), inputs.pooled.bfloat16())
        model = to_fp8(model, amax, fast_accum=True)
        use_sigmoid_gelu(model)
        set_attention_core(model, attention.core)
        tf, encode = callables(model, enc, attention)
        names = {"t2i": f"text-to-image fp8 final latents [{attention.name}]",
                 "i2i": f"image-to-image fp8 final latents, strength {strength}", "enc": "vae encoder bf16 ch-last (eager)",
                 "plain": "fp8 step, plain", "skip": "fp8 step, skip_layers input (Where per block)"}
        for m in MODES:  # text-to-image and image-to-image timed once more (warm): the ratio
            name = names.get({"text-to-image": "t2i", "image-to-image": "i2i"}.get(m, ""), f"{m} fp8 final latents")
            if m in ("text-to-image", "image-to-image"):
                runner.record(name, lambda m=m: lat(m, tf, encode), refs[m], warmup=0, iters=1)
            else:
                record_once(runner, name, lambda m=m: lat(m, tf, encode), refs[m])
            summary[f"cos_{m}"] = runner.rows[-1]["cos_vs_bf16"]
        runner.record(names["enc"], lambda: encode(inputs.image), warmup=2, iters=5)
        skip = torch.zeros(config.transformer.num_layers, device=device)  # [L] the exported graphs' skip input
        with attention.context():
            plain = runner.record(names["plain"], lambda: model(*args))
            runner.record(names["skip"], lambda: model(*args, skip), plain)
        if control:
            control_rows(exact, config, encode, inputs, steps, strength, slg, refs, runner, control)
            summary.update({f"control_cos_{m}": r["cos_vs_bf16"] for m, r in zip(control, runner.rows[-len(control):])})
    ms = {k: next(r["step_ms"] for r in runner.rows if r["name"] == n) for k, n in names.items()}
    kept = len(trim(flow_match_schedule(steps, config.sampling.shift), strength))
    summary.update({f"{k}_ms": v for k, v in ms.items()}, kept_steps=kept, ratio=round(ms["i2i"] / ms["t2i"], 3),
                   expected=round(kept / steps + ms["enc"] / ms["t2i"], 3),
                   skip_input_cost=round(ms["skip"] / ms["plain"], 4))
    print("modes summary:", summary, flush=True)
    return summary
