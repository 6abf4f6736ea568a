"""Initial noise and the denoising loop, for any sampler and any guidance.

The loop (`run`) is one `predict` per entry of `sampler.calls(schedule)` (CFG, CFG + skip-layer
guidance: runtime/guidance.py), then the sampler's pure step function (runtime/samplers.py; Euler:
x <- x + (sigma_next - sigma) * v), then the step hook (the inpainting blend, the user's callback).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .errors import NonFiniteLatentsError
from .guidance import Predict
from .samplers import EULER, Sampler, standard_normal
from .schedule import Schedule

# on_step(step, timestep, latents) -> latents (possibly replaced)
StepHook = Callable[[int, float, torch.Tensor], torch.Tensor]
Transformer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def initial_noise(
    shape: tuple[int, ...],
    generator: torch.Generator | Sequence[torch.Generator] | None,
    device: torch.device,
) -> torch.Tensor:
    """Standard normal fp32 latents drawn on the generator's device (CPU for CPU generators).

    As diffusers' randn_tensor: one draw for a single generator, one draw of batch 1 per
    generator for a list, so the same seeds give the same image on any backend.
    """
    return standard_normal(shape, generator, device)  # [B, 16, H/8, W/8]


def run(
    predict: Predict,
    latents: torch.Tensor,
    schedule: Schedule,
    on_step: StepHook | None = None,
    progress: bool = True,
    backend_name: str = "",
    sampler: Sampler = EULER,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """The loop: `predict` (the guidance: runtime/guidance.py) then `sampler`'s step, per call of
    `sampler.calls(schedule)`. A stochastic sampler draws its noise from `generator` (image i from
    generator i of a list). `on_step` runs after every call (Heun: two per step but the last), as
    diffusers' callback does; image modes compose their blend into it."""
    x = latents.float()  # [B, 16, h, w], fp32 throughout
    calls = sampler.calls(schedule)
    finite = torch.ones(len(calls), dtype=torch.bool, device=x.device)  # checked once, no sync per step
    history = None  # what the sampler carries from one call to the next
    for i, c in enumerate(tqdm(calls, disable=not progress, desc=f"denoise ({sampler.name})")):
        v = predict(x, i, c.timestep)  # [B, 16, h, w] fp32
        x, history = sampler.step(x, c.sigma, c.sigma_next, v, history, generator)
        if on_step is not None:
            x = on_step(i, c.timestep, x)
        finite[i] = torch.isfinite(x).all()
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0])
        raise NonFiniteLatentsError(first, calls[first].sigma, backend_name)
    return x


def chain(*hooks: StepHook | None) -> StepHook | None:
    """One step hook running `hooks` in order (None entries dropped; None if none is left)."""
    live = [h for h in hooks if h is not None]
    if not live:
        return None

    def on_step(i: int, t: float, x: torch.Tensor) -> torch.Tensor:
        for h in live:
            x = h(i, t, x)
        return x

    return on_step
