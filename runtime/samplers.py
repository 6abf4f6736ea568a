"""The samplers: one frozen record each, a pure step function driven by `sampling.run`.

The transformer predicts the flow velocity v (x_t = (1 - sigma) x0 + sigma noise, v = noise - x0).
Each sampler equals a diffusers scheduler on StableDiffusion3Pipeline, operation for operation:

    euler         FlowMatchEulerDiscreteScheduler                                      1 call / step
    dpmpp_2m      DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift,   1 call / step
                  prediction_type="flow_prediction")  (solver_order=2, midpoint, lower_order_final)
    dpmpp_2m_sde  the same with algorithm_type="sde-dpmsolver++": fresh noise each step 1 call / step
    heun          FlowMatchHeunDiscreteScheduler(shift=shift)                          2 calls / step
                  (the last step, to sigma 0, is one Euler call: 2 * steps - 1 calls)

A step function is `step(x, sigma, sigma_next, v, history, generator) -> (x_next, history)`:
`history` is whatever the sampler carries to its next call (None at the start), so no state lives
outside a call and one Pipeline may run different samplers on many threads at once. Scalars are
0-d float32 tensors, as the schedulers' own, so results agree to the last bit on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import InvalidInputError
from .schedule import Schedule, dpm_flow_schedule, flow_match_schedule

Generators = torch.Generator | Sequence[torch.Generator] | None
StepFn = Callable[[torch.Tensor, float, float, torch.Tensor, Any, Generators], tuple[torch.Tensor, Any]]
ScheduleFn = Callable[[int | None, float, Sequence[float] | None], Schedule]


def standard_normal(shape: tuple[int, ...], generator: Generators, device: torch.device) -> torch.Tensor:
    """fp32 N(0, 1) drawn as diffusers' randn_tensor: one draw for a single generator (or None:
    torch's global RNG, on the CPU), one batch-1 draw per generator for a list, on the generator's
    device; so image i of a batch draws only from generator i."""
    if isinstance(generator, (list, tuple)):
        parts = [torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator]
        noise = torch.cat(parts)
    else:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(shape, generator=generator, device=gen_device)
    return noise.to(device=device, dtype=torch.float32)  # [B, *shape[1:]]


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)  # 0-d, as the schedulers' sigmas


# --- Euler ------------------------------------------------------------------------------------
def euler_step(x: torch.Tensor, sigma: float, sigma_next: float, v: torch.Tensor, history: Any,
               generator: Generators) -> tuple[torch.Tensor, None]:
    """x <- x + (sigma_next - sigma) * v, the difference rounded as a float32 subtraction."""
    dt = float(np.float32(sigma_next) - np.float32(sigma))
    return x + dt * v, None


# --- DPM-Solver++ 2M and its SDE form ---------------------------------------------------------
@dataclass(frozen=True)
class DpmHistory:
    x0: torch.Tensor  # [B, 16, h, w] the previous step's data prediction
    sigma: float  # the sigma it was predicted at


def _log_snr(sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(1 - sigma) - torch.log(sigma)  # lambda = log(alpha / sigma), alpha = 1 - sigma


def _dpmpp(x: torch.Tensor, sigma: float, sigma_next: float, v: torch.Tensor, history: DpmHistory | None,
           noise: torch.Tensor | None) -> tuple[torch.Tensor, DpmHistory]:
    """One DPM-Solver++ step (noise None: the ODE form). First order on the first step and on the
    step to sigma 0 (diffusers' lower_order_final with final_sigmas_type="zero"), else 2M midpoint."""
    s0, t = _f32(sigma), _f32(sigma_next)
    x0 = x - s0 * v  # [B, 16, h, w] data prediction of a flow model
    alpha_t = 1 - t
    h = _log_snr(t) - _log_snr(s0)  # inf on the step to sigma 0: the step returns x0
    d1 = None
    if history is not None and sigma_next > 0:
        r0 = (_log_snr(s0) - _log_snr(_f32(history.sigma))) / h
        d1 = (1.0 / r0) * (x0 - history.x0)  # [B, 16, h, w]
    if noise is None:
        x_next = (t / s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        if d1 is not None:
            x_next = x_next - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
    else:
        x_next = (t / s0 * torch.exp(-h)) * x + (alpha_t * (1 - torch.exp(-2.0 * h))) * x0
        if d1 is not None:
            x_next = x_next + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * d1
        x_next = x_next + t * torch.sqrt(1.0 - torch.exp(-2.0 * h)) * noise
    return x_next, DpmHistory(x0, sigma)


def dpmpp_2m_step(x: torch.Tensor, sigma: float, sigma_next: float, v: torch.Tensor, history: DpmHistory | None,
                  generator: Generators) -> tuple[torch.Tensor, DpmHistory]:
    return _dpmpp(x, sigma, sigma_next, v, history, None)


def dpmpp_2m_sde_step(x: torch.Tensor, sigma: float, sigma_next: float, v: torch.Tensor,
                      history: DpmHistory | None, generator: Generators) -> tuple[torch.Tensor, DpmHistory]:
    """As dpmpp_2m plus Brownian noise drawn every step (also the last, where its weight is 0) from
    the request's generator(s), continuing after the initial noise."""
    noise = standard_normal(tuple(x.shape), generator, x.device)  # [B, 16, h, w]
    return _dpmpp(x, sigma, sigma_next, v, history, noise)


# --- Heun -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeunHistory:
    x: torch.Tensor  # [B, 16, h, w] the sample the step started from
    derivative: torch.Tensor  # [B, 16, h, w] dx/dsigma there
    dt: torch.Tensor  # 0-d, sigma_next - sigma


def heun_step(x: torch.Tensor, sigma: float, sigma_next: float, v: torch.Tensor, history: HeunHistory | None,
              generator: Generators) -> tuple[torch.Tensor, HeunHistory | None]:
    """The predictor (history None: an Euler step, v taken at sigma) or the corrector (v taken at
    sigma_next on the predicted sample: the mean of both derivatives, from the step's start)."""
    s, s_next = _f32(sigma), _f32(sigma_next)
    if history is None:
        derivative = (x - (x - v * s)) / s  # via the denoised sample, as diffusers rounds it
        dt = s_next - s
        return x + derivative * dt, (HeunHistory(x, derivative, dt) if sigma_next > 0 else None)
    derivative = 0.5 * (history.derivative + (x - (x - v * s_next)) / s_next)
    return history.x + derivative * history.dt, None


# --- the records --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """One transformer evaluation: the model sees `timestep`; the step goes sigma -> sigma_next."""

    timestep: float
    sigma: float
    sigma_next: float


@dataclass(frozen=True)
class Sampler:
    name: str
    reference: str  # the diffusers scheduler it equals
    step: StepFn
    schedule_fn: Callable[..., Schedule]  # (steps, shift[, sigmas]) -> Schedule
    calls_per_step: int = 1  # 2: a second call at sigma_next corrects the step (Heun)
    custom_sigmas: bool = False  # whether `sigmas=` is accepted (the diffusers scheduler takes them)

    def __post_init__(self) -> None:
        if self.calls_per_step not in (1, 2):
            raise ValueError(f"calls_per_step={self.calls_per_step} of sampler {self.name!r} must be 1 or 2")

    def schedule(self, steps: int | None, shift: float, sigmas: Sequence[float] | None = None) -> Schedule:
        """This sampler's pure schedule, or InvalidInputError for custom sigmas it does not take."""
        if sigmas is None:
            return self.schedule_fn(steps, shift)
        if not self.custom_sigmas:
            takes = [s.name for s in SAMPLERS.values() if s.custom_sigmas]
            raise InvalidInputError(
                f"sigmas={list(sigmas)!r} cannot be used with sampler={self.name!r} (diffusers' {self.reference} "
                f"takes no custom sigmas); pass num_inference_steps, or use sampler in {takes}"
            )
        return self.schedule_fn(steps, shift, sigmas)

    def calls(self, schedule: Schedule) -> tuple[Call, ...]:
        """The transformer evaluations along `schedule`, in order: one per step, and for a sampler
        of two calls per step a second one at sigma_next, except on the step to sigma 0."""
        s, t = schedule.sigmas, schedule.timesteps
        out = []
        for k in range(len(schedule)):
            out.append(Call(t[k], s[k], s[k + 1]))
            if self.calls_per_step == 2 and s[k + 1] > 0:
                out.append(Call(t[k + 1], s[k], s[k + 1]))
        return tuple(out)


EULER = Sampler("euler", "FlowMatchEulerDiscreteScheduler", euler_step, flow_match_schedule, custom_sigmas=True)
DPMPP_2M = Sampler("dpmpp_2m", "DPMSolverMultistepScheduler", dpmpp_2m_step, dpm_flow_schedule)
DPMPP_2M_SDE = Sampler("dpmpp_2m_sde", "DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++')",
                       dpmpp_2m_sde_step, dpm_flow_schedule)
HEUN = Sampler("heun", "FlowMatchHeunDiscreteScheduler", heun_step, flow_match_schedule, calls_per_step=2)
SAMPLERS: dict[str, Sampler] = {s.name: s for s in (EULER, DPMPP_2M, DPMPP_2M_SDE, HEUN)}
SAMPLER_NAMES = tuple(SAMPLERS)


def get_sampler(name: Any) -> Sampler:
    """The sampler called `name`, or InvalidInputError naming the value and the choices."""
    sampler = SAMPLERS.get(name) if isinstance(name, str) else None
    if sampler is None:
        raise InvalidInputError(f"sampler={name!r} is not one of {SAMPLER_NAMES}; pass one of them (default 'euler')")
    return sampler
