"""Initial noise and the flow-matching Euler loop with classifier-free guidance."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .errors import NonFiniteLatentsError
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
    if isinstance(generator, (list, tuple)):
        parts = [torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator]
        noise = torch.cat(parts)
    else:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(shape, generator=generator, device=gen_device)
    return noise.to(device=device, dtype=torch.float32)  # [B, 16, H/8, W/8]


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
) -> torch.Tensor:
    """Euler steps x <- x + (sigma_next - sigma) * v; CFG when guidance > 1 (context = [neg; pos])."""
    cfg = guidance > 1.0
    x = latents.float()  # [B, 16, h, w], fp32 throughout
    finite = torch.ones(len(schedule), dtype=torch.bool, device=x.device)  # checked once, no sync per step
    steps = zip(schedule.timesteps, schedule.deltas())
    for i, (t, dt) in enumerate(tqdm(steps, total=len(schedule), disable=not progress, desc="denoise")):
        x_in = torch.cat([x, x]) if cfg else x  # [2B or B, 16, h, w]
        timestep = torch.full((x_in.shape[0],), t, dtype=torch.float32, device=x.device)
        v = transformer(x_in, timestep, context, pooled).float()
        if cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance * (v_cond - v_uncond)
        x = x + dt * v
        if on_step is not None:
            x = on_step(i, t, x)
        finite[i] = torch.isfinite(x).all()
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0])
        raise NonFiniteLatentsError(first, schedule.sigmas[first], backend_name)
    return x
