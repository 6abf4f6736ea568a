"""Validation of a generation request, before any heavy work.

`normalize_request` turns the diffusers-shaped keyword arguments into a `Request` with every
default resolved, or raises InvalidInputError naming the value and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .config import VariantConfig
from .crop import Overlay, prepare as prepare_crop
from .errors import InvalidInputError
from .guidance import SkipLayerGuidance
from .images_in import preprocess, source_sizes
from .samplers import Sampler, get_sampler
from .schedule import Schedule, trim

OUTPUT_TYPES = ("pil", "np", "latent")
MAX_T5_TOKENS = 512


@dataclass(frozen=True)
class Request:
    prompts: tuple[str, ...]  # one per image (already repeated num_images_per_prompt times)
    prompts_2: tuple[str, ...]
    prompts_3: tuple[str, ...]
    negatives: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] | None  # None: no CFG
    height: int
    width: int
    sampler: Sampler
    schedule: Schedule  # the sampler's own (DPM-Solver has its own grid)
    guidance: float
    max_sequence_length: int
    output_type: str
    image: torch.Tensor | None = field(default=None, compare=False)  # [K, 3, H, W] in [-1, 1]; K divides batch
    mask: torch.Tensor | None = field(default=None, compare=False)  # [M, 1, H, W] in {0, 1} (1: repaint)
    strength: float = 1.0  # image modes: the schedule above is already trimmed to it
    slg: SkipLayerGuidance | None = None
    loras: tuple[dict[str, float], ...] | None = field(default=None, compare=False)  # per image {LoRA: strength} (runtime/lora.py)
    overlay: Overlay | None = field(default=None, compare=False)  # padding_mask_crop: pasted back after decoding

    @property
    def batch(self) -> int:
        return len(self.prompts)

    @property
    def mode(self) -> str:
        return "text-to-image" if self.image is None else "image-to-image" if self.mask is None else "inpainting"


def _prompt_list(name: str, value: Any, n: int | None) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
        raise InvalidInputError(f"{name}={value!r} must be a string or a list of strings")
    if not items:
        raise InvalidInputError(f"{name}=[] is empty; pass at least one prompt string")
    if isinstance(value, str) and n is not None:
        items = items * n  # one string applies to every prompt
    if n is not None and len(items) != n:
        raise InvalidInputError(
            f"{name} has {len(items)} entries but prompt has {n}; pass {n} strings or one string"
        )
    return list(items)


def _int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InvalidInputError(f"{name}={value!r} must be an int {rng}")
    return value


def _repeat(items: Sequence[str], n: int) -> tuple[str, ...]:
    return tuple(p for p in items for _ in range(n))


def normalize_request(
    config: VariantConfig,
    prompt: str | Sequence[str],
    prompt_2: str | Sequence[str] | None = None,
    prompt_3: str | Sequence[str] | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    negative_prompt_2: str | Sequence[str] | None = None,
    negative_prompt_3: str | Sequence[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    sigmas: Sequence[float] | None = None,
    num_images_per_prompt: int = 1,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    max_sequence_length: int = 256,
    output_type: str = "pil",
    sampler: str = "euler",
    image: Any = None,
    mask_image: Any = None,
    strength: float = 0.6,
    padding_mask_crop: int | None = None,
    skip_guidance_layers: Sequence[int] | None = None,
    skip_layer_guidance_scale: float = 2.8,
    skip_layer_guidance_start: float = 0.01,
    skip_layer_guidance_stop: float = 0.2,
) -> Request:
    """A `Pipeline` call's arguments (same names and defaults) as a Request, or InvalidInputError."""
    chosen = get_sampler(sampler)
    prompts = _prompt_list("prompt", prompt, None)
    if prompts is None:
        raise InvalidInputError("prompt=None; pass a prompt string or a list of strings")
    n = len(prompts)
    p2 = _prompt_list("prompt_2", prompt_2, n) or prompts
    p3 = _prompt_list("prompt_3", prompt_3, n) or prompts
    height = config.default_size if height is None else height
    width = config.default_size if width is None else width
    config.check_size(height, width)
    guidance = config.sampling.guidance if guidance_scale is None else guidance_scale
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not math.isfinite(guidance) or guidance < 0:
        raise InvalidInputError(
            f"guidance_scale={guidance!r} must be a finite number >= 0 (<= 1 disables CFG; "
            f"{config.name} uses {config.sampling.guidance})"
        )
    steps = num_inference_steps
    if sigmas is None:
        steps = config.sampling.steps if steps is None else _int("num_inference_steps", steps, 1)
    schedule = chosen.schedule(steps, config.sampling.shift, sigmas)
    per = _int("num_images_per_prompt", num_images_per_prompt, 1)
    max_seq = _int("max_sequence_length", max_sequence_length, 1, MAX_T5_TOKENS)
    if output_type not in OUTPUT_TYPES:
        raise InvalidInputError(f"output_type={output_type!r} must be one of {OUTPUT_TYPES}")
    negatives = None
    if guidance > 1.0:
        neg = _prompt_list("negative_prompt", negative_prompt or "", n)
        neg2 = _prompt_list("negative_prompt_2", negative_prompt_2, n) or neg
        neg3 = _prompt_list("negative_prompt_3", negative_prompt_3, n) or neg
        negatives = (_repeat(neg, per), _repeat(neg2, per), _repeat(neg3, per))
    slg = _skip_layers(config, skip_guidance_layers, skip_layer_guidance_scale, skip_layer_guidance_start,
                       skip_layer_guidance_stop, negatives is not None)
    batch = len(prompts) * per
    edit = _edit(image, mask_image, strength, padding_mask_crop, schedule, batch, height, width)
    req = Request(
        prompts=_repeat(prompts, per), prompts_2=_repeat(p2, per), prompts_3=_repeat(p3, per),
        negatives=negatives, height=height, width=width, sampler=chosen, schedule=edit.pop("schedule", schedule),
        guidance=float(guidance), max_sequence_length=max_seq, output_type=output_type, slg=slg, **edit,
    )
    _check_generator(generator, req.batch)
    _check_latents(latents, config.latent_shape(req.batch, height, width))
    return req


def _number(name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidInputError(f"{name}={value!r} must be a finite number")
    return float(value)


def _skip_layers(config: VariantConfig, layers: Any, scale: Any, start: Any, stop: Any,
                 cfg: bool) -> SkipLayerGuidance | None:
    if layers is None:
        return None
    n = config.transformer.num_layers
    if isinstance(layers, int) or not isinstance(layers, (list, tuple)) or not layers or not all(
            isinstance(k, int) and not isinstance(k, bool) and 0 <= k < n for k in layers):
        raise InvalidInputError(f"skip_guidance_layers={layers!r} must be a non-empty list of block indices in "
                                f"[0, {n - 1}] ({config.name} has {n} blocks; SD3.5 Medium uses [7, 8, 9])")
    if not cfg:
        raise InvalidInputError(f"skip_guidance_layers={list(layers)!r} needs classifier-free guidance; pass "
                                f"guidance_scale > 1 or drop skip_guidance_layers")
    scale, start, stop = (_number(f"skip_layer_guidance_{k}", v) for k, v in
                          (("scale", scale), ("start", start), ("stop", stop)))
    if not 0.0 <= start < stop <= 1.0:
        raise InvalidInputError(f"skip_layer_guidance_start={start} / skip_layer_guidance_stop={stop} must satisfy "
                                f"0 <= start < stop <= 1 (fractions of the steps; default 0.01 / 0.2)")
    return SkipLayerGuidance(tuple(layers), scale, start, stop)


def _edit(image: Any, mask_image: Any, strength: Any, padding_mask_crop: Any, schedule: Schedule, batch: int,
          height: int, width: int) -> dict[str, Any]:
    """The image-mode fields of a Request (empty for text-to-image), the schedule trimmed to `strength`."""
    if image is None:
        if mask_image is not None:
            raise InvalidInputError("mask_image was given without image; pass the image to inpaint as image=")
        return {}
    overlay = None if padding_mask_crop is None else prepare_crop(image, mask_image, padding_mask_crop, width, height)
    box = None if overlay is None else overlay.box
    strength = _number("strength", strength)
    if not 0.0 < strength <= 1.0:
        raise InvalidInputError(f"strength={strength} must be in (0, 1] (1: the image is fully re-noised)")
    trimmed = trim(schedule, strength)
    if len(trimmed) == 0:
        raise InvalidInputError(f"strength={strength} leaves 0 of {len(schedule)} steps; pass strength >= "
                                f"{1 / len(schedule):.3g} or more num_inference_steps")
    pixels = preprocess("image", image, height, width, box=box)  # [K, 3, H, W]
    out: dict[str, Any] = {"schedule": trimmed, "image": pixels, "strength": strength, "overlay": overlay}
    _check_count("image", pixels.shape[0], batch)
    if mask_image is not None:
        mask = preprocess("mask_image", mask_image, height, width, mask=True, box=box)  # [M, 1, H, W]
        sizes, mask_sizes = source_sizes("image", image), source_sizes("mask_image", mask_image, mask=True)
        if set(mask_sizes) != set(sizes) or len(set(sizes)) > 1:
            raise InvalidInputError(f"mask_image is {sorted(set(mask_sizes))} (height, width) but image is "
                                    f"{sorted(set(sizes))}; pass a mask of the image's size")
        _check_count("mask_image", mask.shape[0], batch)
        if mask.shape[0] != pixels.shape[0] and min(mask.shape[0], pixels.shape[0]) != 1:
            raise InvalidInputError(f"{mask.shape[0]} masks for {pixels.shape[0]} images; pass one mask or one per image")
        empty = [i for i in range(mask.shape[0]) if not bool(mask[i].any())]
        if empty:
            raise InvalidInputError(f"mask_image {empty} has no pixel >= 0.5 (nothing to repaint); white (1) marks "
                                    f"what to repaint, black (0) what to keep")
        out["mask"] = mask
    return out


def _check_count(name: str, k: int, batch: int) -> None:
    if batch % k:
        raise InvalidInputError(f"{name} holds {k} images for a batch of {batch} (prompts x num_images_per_prompt); "
                                f"pass 1 or {batch}, or a number that divides {batch}")


def _check_generator(generator: Any, batch: int) -> None:
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generator):
        raise InvalidInputError(f"generator={generator!r} must be a torch.Generator or a list of them")
    if len(generator) != batch:
        raise InvalidInputError(
            f"generator list has {len(generator)} generators but the batch is {batch} images "
            f"(prompts x num_images_per_prompt); pass {batch} generators or a single one"
        )


def _check_latents(latents: Any, shape: tuple[int, ...]) -> None:
    if latents is None:
        return
    if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise InvalidInputError(f"latents has shape {got}; this request needs {shape} [B, 16, H/8, W/8]")
    if not bool(torch.isfinite(latents).all()):
        raise InvalidInputError("latents contain NaN or Inf; pass finite initial noise")
