"""Initial noise and the denoising loop with classifier-free guidance, for any sampler.

The loop is one transformer call per entry of `sampler.calls(schedule)`, then the sampler's pure
step function (runtime/samplers.py; Euler: x <- x + (sigma_next - sigma) * v).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .errors import NonFiniteLatentsError
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


def denoise(
    transformer: Transformer,
    latents: torch.Tensor,
    context: torch.Tensor,
    pooled: torch.Tensor,
    schedule: Schedule,
    guidance: float,
    on_step: StepHook | None = None,
    progress: bool = True,
    backend_name: str = "",
    sampler: Sampler = EULER,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """`sampler`'s steps along `schedule`; CFG when guidance > 1 (context = [neg; pos]). A stochastic
    sampler draws its noise from `generator` (image i from generator i of a list). `on_step` runs
    after every transformer call (Heun: two per step but the last), as diffusers' callback does."""
    cfg = guidance > 1.0
    x = latents.float()  # [B, 16, h, w], fp32 throughout
    calls = sampler.calls(schedule)
    finite = torch.ones(len(calls), dtype=torch.bool, device=x.device)  # checked once, no sync per step
    history = None  # what the sampler carries from one call to the next
    for i, c in enumerate(tqdm(calls, disable=not progress, desc=f"denoise ({sampler.name})")):
        x_in = torch.cat([x, x]) if cfg else x  # [2B or B, 16, h, w]
        timestep = torch.full((x_in.shape[0],), c.timestep, dtype=torch.float32, device=x.device)
        v = transformer(x_in, timestep, context, pooled).float()
        if cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance * (v_cond - v_uncond)
        x, history = sampler.step(x, c.sigma, c.sigma_next, v, history, generator)
        if on_step is not None:
            x = on_step(i, c.timestep, x)
        finite[i] = torch.isfinite(x).all()
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0])
        raise NonFiniteLatentsError(first, calls[first].sigma, backend_name)
    return x
