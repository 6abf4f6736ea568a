"""Validation of a generation request, before any heavy work.

`normalize_request` turns the diffusers-shaped keyword arguments into a `Request` with every
default resolved, or raises InvalidInputError naming the value and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .config import VariantConfig
from .errors import InvalidInputError
from .samplers import Sampler, get_sampler
from .schedule import Schedule

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

    @property
    def batch(self) -> int:
        return len(self.prompts)


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
    req = Request(
        prompts=_repeat(prompts, per), prompts_2=_repeat(p2, per), prompts_3=_repeat(p3, per),
        negatives=negatives, height=height, width=width, sampler=chosen, schedule=schedule,
        guidance=float(guidance), max_sequence_length=max_seq, output_type=output_type,
    )
    _check_generator(generator, req.batch)
    _check_latents(latents, config.latent_shape(req.batch, height, width))
    return req


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
