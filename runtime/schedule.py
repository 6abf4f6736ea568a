"""Flow-matching sigma schedule as a pure function (no scheduler object, no hidden state).

Bit-for-bit equal to diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps for the SD3.5
scheduler config (static shift, no dynamic shifting), including its quirks: sigma_min is the
*shifted* last training sigma, the linspace between sigma_max and sigma_min is shifted once more,
default schedules are computed in float64 then rounded to float32, custom sigmas are shifted in
float32, and a trailing 0 is appended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import InvalidInputError


@dataclass(frozen=True)
class Schedule:
    sigmas: tuple[float, ...]  # len = steps + 1, ends with 0.0
    timesteps: tuple[float, ...]  # len = steps, sigma * num_train_timesteps (float32)

    def __len__(self) -> int:
        return len(self.timesteps)

    def deltas(self) -> tuple[float, ...]:
        """sigma_next - sigma per step, rounded as a float32 subtraction (as diffusers does)."""
        s = np.asarray(self.sigmas, dtype=np.float32)
        return tuple(float(d) for d in (s[1:] - s[:-1]))


def _shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_match_schedule(
    steps: int | None,
    shift: float = 3.0,
    sigmas: Sequence[float] | None = None,
    num_train_timesteps: int = 1000,
) -> Schedule:
    """Sigmas (with trailing 0) and timesteps for `steps` Euler steps, or for custom `sigmas`."""
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise InvalidInputError(f"shift={shift!r} must be a finite number > 0 (SD3.5 uses 3.0)")
    if sigmas is not None:
        custom = np.asarray(list(sigmas), dtype=np.float32)
        if custom.ndim != 1 or custom.size == 0 or not np.all(np.isfinite(custom)):
            raise InvalidInputError(f"sigmas={list(sigmas)!r} must be a non-empty list of finite floats")
        if steps is not None and steps != custom.size:
            raise InvalidInputError(
                f"num_inference_steps={steps} disagrees with len(sigmas)={custom.size}; pass one of them"
            )
        shifted = _shift(custom, float(shift)).astype(np.float32)
    else:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise InvalidInputError(f"num_inference_steps={steps!r} must be an int >= 1")
        # The training grid, shifted in float32 exactly as the scheduler's constructor does.
        train = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)
        train_sigmas = _shift(train / np.float32(num_train_timesteps), float(shift))
        sigma_max = float(train_sigmas[-1]) * num_train_timesteps
        sigma_min = float(train_sigmas[0]) * num_train_timesteps
        grid = np.linspace(sigma_max, sigma_min, steps) / num_train_timesteps  # float64
        shifted = _shift(grid, float(shift)).astype(np.float32)
    times = shifted * np.float32(num_train_timesteps)
    return Schedule(
        sigmas=tuple(float(s) for s in shifted) + (0.0,),
        timesteps=tuple(float(t) for t in times.astype(np.float32)),
    )
