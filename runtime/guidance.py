"""Guidance: how one denoising call turns latents into a velocity, as a callable for the loop.

`predict(x, i, timestep) -> v` runs the transformer pass(es) of call `i`:
  no CFG   one pass on [B] rows;
  CFG      one pass on [2B] rows ([negatives; prompts]), v = v_u + g (v_c - v_u);
  CFG+SLG  inside the skip-layer window a third pass on the prompts' half with the listed blocks
           skipped, v += (v_c - v_skip) * slg_scale (diffusers' StableDiffusion3Pipeline), the
           window test on the call index i: start * steps < i < stop * steps (strict, as diffusers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Predict = Callable[[torch.Tensor, int, float], torch.Tensor]
# (x_in, call index, timestep [B']) -> extra keyword arguments of the main transformer pass
Residuals = Callable[[torch.Tensor, int, torch.Tensor], dict]
Transformer = Callable[..., torch.Tensor]  # (x, timestep, context, pooled[, skip_layers=]) -> v


@dataclass(frozen=True)
class SkipLayerGuidance:
    layers: tuple[int, ...]  # transformer blocks skipped in the third pass
    scale: float = 2.8
    start: float = 0.01  # fraction of the steps
    stop: float = 0.2

    def active(self, i: int, steps: int) -> bool:
        return i > steps * self.start and i < steps * self.stop


def guided(transformer: Transformer, context: torch.Tensor, pooled: torch.Tensor, guidance: float,
           slg: SkipLayerGuidance | None = None, steps: int = 0, residuals: Residuals | None = None) -> Predict:
    """The predict callable of a request: `context`/`pooled` are [2B, ...] ([neg; pos]) under CFG
    (guidance > 1), else [B, ...]; `steps` is what the SLG window is a fraction of; `residuals`
    (ControlNets, runtime/control.py) gives the main pass's extra transformer arguments."""
    cfg = guidance > 1.0
    half = context.shape[0] // 2
    pos_context, pos_pooled = context[half:], pooled[half:]  # [B, 77+T, 4096], [B, 2048]

    def predict(x: torch.Tensor, i: int, timestep: float) -> torch.Tensor:
        x_in = torch.cat([x, x]) if cfg else x  # [2B or B, 16, h, w]
        t = torch.full((x_in.shape[0],), timestep, dtype=torch.float32, device=x.device)
        extra = residuals(x_in, i, t) if residuals is not None else {}
        v = transformer(x_in, t, context, pooled, **extra).float()
        if not cfg:
            return v
        v_uncond, v_cond = v.chunk(2)
        v = v_uncond + guidance * (v_cond - v_uncond)
        if slg is not None and slg.active(i, steps):
            v_skip = transformer(x, t[: x.shape[0]], pos_context, pos_pooled, skip_layers=slg.layers).float()
            v = v + (v_cond - v_skip) * slg.scale
        return v

    return predict
