"""Flow-matching sigma schedules as pure functions (no scheduler object, no hidden state).

`flow_match_schedule` is bit-for-bit diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps for
the SD3.5 scheduler config (static shift, no dynamic shifting), including its quirks: sigma_min is
the *shifted* last training sigma, the linspace between sigma_max and sigma_min is shifted once
more, default schedules are computed in float64 then rounded to float32, custom sigmas are shifted
in float32, and a trailing 0 is appended. FlowMatchHeunDiscreteScheduler uses the same sigmas.

`dpm_flow_schedule` is DPMSolverMultistepScheduler.set_timesteps with use_flow_sigmas=True and
final_sigmas_type="zero": a different grid (it starts below 1 at shift(1 - 1/1000)) and integer
timesteps (sigma * 1000 truncated, diffusers' int64 cast).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import InvalidInputError


@dataclass(frozen=True)
class Schedule:
    sigmas: tuple[float, ...]  # len = steps + 1, ends with 0.0 (float32 values)
    timesteps: tuple[float, ...]  # len = steps, what the transformer sees: sigma * 1000 (float32; DPM: truncated)

    def __len__(self) -> int:
        return len(self.timesteps)

    def deltas(self) -> tuple[float, ...]:
        """sigma_next - sigma per step, rounded as a float32 subtraction (as diffusers does)."""
        s = np.asarray(self.sigmas, dtype=np.float32)
        return tuple(float(d) for d in (s[1:] - s[:-1]))


def _shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _check_shift(shift: float) -> None:
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise InvalidInputError(f"shift={shift!r} must be a finite number > 0 (SD3.5 uses 3.0)")


def _check_steps(steps: int | None) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise InvalidInputError(f"num_inference_steps={steps!r} must be an int >= 1")


def flow_match_schedule(
    steps: int | None,
    shift: float = 3.0,
    sigmas: Sequence[float] | None = None,
    num_train_timesteps: int = 1000,
) -> Schedule:
    """Sigmas (with trailing 0) and timesteps for `steps` Euler steps, or for custom `sigmas`."""
    _check_shift(shift)
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
        _check_steps(steps)
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


def dpm_flow_schedule(steps: int | None, shift: float = 3.0, num_train_timesteps: int = 1000) -> Schedule:
    """Sigmas (with trailing 0) and integer timesteps of DPMSolverMultistepScheduler(use_flow_sigmas=True,
    flow_shift=shift) for `steps` steps: shift(1 - linspace(1, 1/T, steps + 1)), reversed, the 0 dropped,
    in float64; sigmas rounded to float32, timesteps = trunc(sigma * T) of the float64 sigmas."""
    _check_shift(shift)
    _check_steps(steps)
    alphas = np.linspace(1, 1 / num_train_timesteps, steps + 1)  # float64, [steps + 1]
    sigmas = _shift(1.0 - alphas, float(shift))[::-1][:-1]  # [steps], descending, all > 0
    times = np.trunc(sigmas * num_train_timesteps)
    return Schedule(
        sigmas=tuple(float(s) for s in sigmas.astype(np.float32)) + (0.0,),
        timesteps=tuple(float(t) for t in times),
    )


def strength_start(steps: int, strength: float) -> int:
    """The first step image-to-image runs for `strength` (diffusers' get_timesteps, its float
    arithmetic included: 10 steps at strength 0.3 start at step 6, not 7)."""
    init = min(steps * strength, steps)
    return int(max(steps - init, 0))


def trim(schedule: Schedule, strength: float) -> Schedule:
    """`schedule` from the step `strength` starts at (image-to-image / inpainting): the first
    `strength_start` steps dropped, for any sampler's schedule (a sampler of two calls per step
    derives them from the kept steps). Pure; may return zero steps (the request check refuses)."""
    start = strength_start(len(schedule), strength)
    return Schedule(sigmas=schedule.sigmas[start:], timesteps=schedule.timesteps[start:])
