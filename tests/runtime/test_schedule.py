"""Our pure sigma schedule equals diffusers' FlowMatchEulerDiscreteScheduler exactly."""

import pytest

from sd35trt.runtime import InvalidInputError, flow_match_schedule
from sd35trt.runtime.schedule import dpm_flow_schedule

diffusers = pytest.importorskip("diffusers", reason="diffusers (test extra) is the reference scheduler")


def _reference(shift: float, steps: int | None = None, sigmas: list[float] | None = None):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps, sigmas=sigmas)
    return sched.sigmas.tolist(), sched.timesteps.tolist()


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_default_schedules_equal_diffusers(shift: float) -> None:
    for steps in range(1, 51):
        ours = flow_match_schedule(steps, shift)
        sigmas, timesteps = _reference(shift, steps)
        assert list(ours.sigmas) == sigmas, steps
        assert list(ours.timesteps) == timesteps, steps
        assert ours.sigmas[-1] == 0.0 and len(ours) == steps


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_custom_sigmas_equal_diffusers(shift: float) -> None:
    custom = [1.0, 0.9, 0.75, 0.5, 0.3, 0.1, 0.02]
    ours = flow_match_schedule(None, shift, sigmas=custom)
    sigmas, timesteps = _reference(shift, sigmas=custom)
    assert list(ours.sigmas) == sigmas
    assert list(ours.timesteps) == timesteps


def test_deltas_match_float32_subtraction() -> None:
    import torch

    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(28)
    expected = (sched.sigmas[1:] - sched.sigmas[:-1]).tolist()
    assert list(flow_match_schedule(28, 3.0).deltas()) == expected
    assert torch.float32 == sched.sigmas.dtype


def test_sigma_min_is_shifted_twice() -> None:
    # diffusers takes sigma_min from the *shifted* training grid, then shifts the linspace again
    last = flow_match_schedule(50, 3.0).sigmas[-2]
    once = 3.0 * 0.001 / (1 + 2.0 * 0.001)
    assert last > once * 2


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_steps_rejected(bad) -> None:
    with pytest.raises(InvalidInputError, match=repr(bad)):
        flow_match_schedule(bad)


def test_bad_sigmas_rejected() -> None:
    with pytest.raises(InvalidInputError, match="nan"):
        flow_match_schedule(None, sigmas=[1.0, float("nan")])
    with pytest.raises(InvalidInputError, match="len"):
        flow_match_schedule(3, sigmas=[1.0, 0.5])


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dpm_flow_schedule_equals_diffusers(shift: float) -> None:
    for steps in range(1, 51):
        sched = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift,
                                                      prediction_type="flow_prediction")
        sched.set_timesteps(steps)
        ours = dpm_flow_schedule(steps, shift)
        assert list(ours.sigmas) == sched.sigmas.tolist(), steps
        assert list(ours.timesteps) == [float(t) for t in sched.timesteps.tolist()], steps  # int64 there
        assert ours.sigmas[0] < 1.0 and ours.sigmas[-1] == 0.0 and len(ours) == steps


@pytest.mark.parametrize("bad", [0, 1.5, None])
def test_dpm_flow_schedule_refuses_bad_steps(bad) -> None:
    with pytest.raises(InvalidInputError, match=f"num_inference_steps={bad!r}"):
        dpm_flow_schedule(bad)
