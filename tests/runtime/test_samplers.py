"""The samplers equal diffusers' schedulers: step by step, and through the whole pipeline.

Reference: StableDiffusion3Pipeline with its scheduler swapped for
  dpmpp_2m      DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
  dpmpp_2m_sde  the same with algorithm_type="sde-dpmsolver++"
  heun          FlowMatchHeunDiscreteScheduler(shift=3.0)
StableDiffusion3Pipeline does not hand its generator to `scheduler.step`, so there the SDE noise comes
from torch's global RNG; diffusers' other pipelines pass it (`prepare_extra_step_kwargs`), and the
scheduler then draws from it. Both are checked: with a generator (list), the reference scheduler
steps with that same generator (`step(..., generator=g)`, the scheduler's own argument); with
generator=None, both pipelines run as they are under one `torch.manual_seed`.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from sd35trt.runtime import Pipeline
from sd35trt.runtime.samplers import SAMPLERS

diffusers = pytest.importorskip("diffusers", reason="diffusers (test extra) holds the reference schedulers")

NEW = ("dpmpp_2m", "dpmpp_2m_sde", "heun")
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry, low quality"
SIZE = dict(height=64, width=64)


def _scheduler(name: str, shift: float = 3.0):
    """A fresh diffusers scheduler equal to sampler `name` (schedulers keep state: one per run)."""
    if name == "euler":
        return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    if name == "heun":
        return diffusers.FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sde = {"algorithm_type": "sde-dpmsolver++"} if name == "dpmpp_2m_sde" else {}
    return diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift,
                                                 prediction_type="flow_prediction", **sde)


# --- step by step, on an analytic velocity field (no model): bit for bit ------------------------
def _field(x: torch.Tensor, timestep: float) -> torch.Tensor:
    return torch.tanh(x) * (timestep / 1000.0) - 0.3 * x + 0.05  # [B, 16, 4, 4]


def _ours_along(name: str, steps: int, x: torch.Tensor, gen) -> tuple[torch.Tensor, list[float]]:
    sampler = SAMPLERS[name]
    history, seen = None, []
    for c in sampler.calls(sampler.schedule(steps, 3.0)):
        seen.append(c.timestep)
        x, history = sampler.step(x, c.sigma, c.sigma_next, _field(x, c.timestep), history, gen)
    return x, seen


def _reference_along(name: str, steps: int, x: torch.Tensor, gen) -> tuple[torch.Tensor, list[float]]:
    sched = _scheduler(name)
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        x = sched.step(_field(x, float(t)), t, x, generator=gen).prev_sample
    return x, [float(t) for t in sched.timesteps]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_steps_equal_the_diffusers_scheduler_bit_for_bit(name: str) -> None:
    for steps in (1, 2, 3, 4, 7, 14, 15, 20, 50):
        x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(steps))  # [B, 16, h, w]
        gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(2)]  # noqa: E731
        ours, our_times = _ours_along(name, steps, x.clone(), gens())
        ref, ref_times = _reference_along(name, steps, x.clone(), gens())
        assert our_times == ref_times, (name, steps)  # the transformer sees the same timesteps
        assert torch.equal(ours, ref), (name, steps, float((ours - ref).abs().max()))
    assert len(our_times) == (2 * 50 - 1 if name == "heun" else 50)


def test_sde_noise_of_image_i_comes_from_generator_i() -> None:
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    both, _ = _ours_along("dpmpp_2m_sde", 6, x.clone(), [torch.Generator().manual_seed(s) for s in (5, 6)])
    alone, _ = _ours_along("dpmpp_2m_sde", 6, x[1:].clone(), [torch.Generator().manual_seed(6)])
    other, _ = _ours_along("dpmpp_2m_sde", 6, x[1:].clone(), [torch.Generator().manual_seed(7)])
    assert torch.equal(both[1:], alone)
    assert float((alone - other).abs().max()) > 0.01  # the noise really comes from the generator


# --- the whole pipeline against StableDiffusion3Pipeline ----------------------------------------
@pytest.fixture(scope="module")
def pipes(tiny_models: dict[str, Path]):
    out = {}
    for variant in ("medium", "large"):
        ref = diffusers.StableDiffusion3Pipeline.from_pretrained(tiny_models[variant], torch_dtype=torch.float32)
        ref.set_progress_bar_config(disable=True)
        ours = Pipeline.from_pretrained(tiny_models[variant], backend="torch", device="cpu", dtype=torch.float32)
        out[variant] = (ref, ours)
    return out


def _reference(ref, name: str, generator=None):
    """`ref`'s components with the scheduler of `name`; its step draws from `generator` when given."""
    sched = _scheduler(name, ref.scheduler.config.shift)
    if generator is not None:
        sched.step = functools.partial(sched.step, generator=generator)
    pipe = diffusers.StableDiffusion3Pipeline(**{**ref.components, "scheduler": sched})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _both(pipes, variant: str, name: str, seeds=(1234,), **kw) -> tuple[np.ndarray, np.ndarray]:
    ref, ours = pipes[variant]
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, output_type="np", **SIZE, **kw)
    gens = lambda: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    g = gens() if len(seeds) > 1 else gens()[0]
    a = _reference(ref, name, g)(generator=g, **kw).images
    b = ours(generator=gens() if len(seeds) > 1 else gens()[0], sampler=name, progress=False, **kw).images
    return np.asarray(a), np.asarray(b)


@pytest.mark.parametrize("variant", ["medium", "large"])
@pytest.mark.parametrize("name", NEW)
def test_pipeline_equals_diffusers_with_the_scheduler_swapped(pipes, variant: str, name: str, capsys) -> None:
    seen = {}
    for steps in (1, 4, 20):
        for guidance in (1.0, 4.0):
            a, b = _both(pipes, variant, name, num_inference_steps=steps, guidance_scale=guidance)
            diff = float(np.abs(a - b).max())
            seen[f"{steps}/{'cfg' if guidance > 1 else 'nocfg'}"] = f"{diff:.1e}"
            assert a.shape == b.shape == (1, 64, 64, 3)
            assert diff <= 1e-4, (steps, guidance, diff)
            assert a.std() > 0.02  # a real image, not a flat one
    with capsys.disabled():
        print(f"\n[{name} {variant} vs diffusers, max abs per steps/cfg: {seen}]")


@pytest.mark.parametrize("name", NEW)
def test_batch_of_two_with_a_generator_list_equals_diffusers(pipes, name: str) -> None:
    kw = dict(num_inference_steps=4, guidance_scale=4.0, num_images_per_prompt=2)
    a, b = _both(pipes, "medium", name, seeds=(7, 8), **kw)
    assert a.shape == b.shape == (2, 64, 64, 3)
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(b[0] - b[1]).max() > 0.01  # the two seeds give two images


def test_sde_without_a_generator_equals_diffusers_as_it_is(pipes) -> None:
    # No generator: the initial and the SDE noise come from torch's global RNG, in both pipelines.
    ref, ours = pipes["large"]
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=3.5,
              output_type="np", **SIZE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)
        a = _reference(ref, "dpmpp_2m_sde")(**kw).images
        torch.manual_seed(99)
        b = ours(sampler="dpmpp_2m_sde", progress=False, **kw).images
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("name", ["dpmpp_2m", "heun"])
def test_callback_sees_what_the_diffusers_callback_sees(pipes, name: str) -> None:
    ref, ours = pipes["medium"]
    kw = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=1.0, output_type="latent", **SIZE)
    calls: dict[str, list] = {"ref": [], "ours": []}

    def recorder(key: str):
        def callback(pipe, i, t, kwargs):
            calls[key].append((i, float(t), kwargs["latents"].clone()))
            return {}
        return callback

    _reference(ref, name)(generator=torch.Generator().manual_seed(3), callback_on_step_end=recorder("ref"), **kw)
    ours(generator=torch.Generator().manual_seed(3), callback_on_step_end=recorder("ours"), sampler=name,
         progress=False, **kw)
    assert len(calls["ours"]) == (7 if name == "heun" else 4)  # Heun: 2 calls per step, 1 for the last
    assert [c[:2] for c in calls["ours"]] == [c[:2] for c in calls["ref"]]
    assert max(float((a[2] - b[2]).abs().max()) for a, b in zip(calls["ours"], calls["ref"])) <= 1e-5


# --- one step, batching, threads --------------------------------------------------------------
def _image(pipe: Pipeline, name: str, seeds=(5,), prompt: str | list[str] = PROMPT, **kw) -> np.ndarray:
    kw = {**dict(negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=4.0, output_type="np", **SIZE), **kw}
    return pipe(prompt, generator=[torch.Generator().manual_seed(s) for s in seeds], sampler=name,
                progress=False, **kw).images


def test_one_step_edge_cases(pipes) -> None:
    ours = pipes["medium"][1]
    one = functools.partial(_image, ours, num_inference_steps=1)
    # Heun's one step is one Euler call (there is nothing to correct at sigma 0) on Euler's schedule
    assert np.array_equal(one("heun"), one("euler"))
    # the step to sigma 0 gives the data prediction: the SDE's noise weighs 0 there
    assert np.array_equal(one("dpmpp_2m_sde"), one("dpmpp_2m"))
    assert np.abs(one("dpmpp_2m") - one("euler")).max() > 1e-3  # DPM-Solver starts at shift(0.999), not 1


def test_samplers_really_differ_and_default_is_euler(pipes) -> None:
    ours = pipes["medium"][1]
    images = {name: _image(ours, name) for name in SAMPLERS}
    default = ours(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=4.0, output_type="np",
                   generator=[torch.Generator().manual_seed(5)], progress=False, **SIZE)
    assert np.array_equal(default.images, images["euler"]) and default.info["sampler"] == "euler"
    names = sorted(images)
    assert min(np.abs(images[a] - images[b]).max() for a in names for b in names if a < b) > 0.01


def test_batched_sde_images_equal_their_twins(pipes, capsys) -> None:
    # torch's CPU GEMMs round a batch of 2 and of 1 differently (Euler too: ~3e-6 in the image), so
    # 1e-5 here; the noise itself is per image (bit for bit above), and on ONNX Runtime a batched
    # SDE job equals its twin within 1e-6 (tests/runtime/test_batching.py).
    ours = pipes["medium"][1]
    prompts = [PROMPT, "a red fox in fresh snow"]
    both = _image(ours, "dpmpp_2m_sde", seeds=(11, 12), prompt=prompts, negative_prompt=[NEGATIVE, ""])
    twins = [_image(ours, "dpmpp_2m_sde", seeds=(s,), prompt=p, negative_prompt=n)
             for s, p, n in ((11, prompts[0], NEGATIVE), (12, prompts[1], ""))]
    diff = max(float(np.abs(both[i] - twins[i][0]).max()) for i in range(2))
    with capsys.disabled():
        print(f"\n[dpmpp_2m_sde batch of 2 vs twins (torch): max abs {diff:.1e}]")
    assert diff <= 1e-5


def test_threads_running_different_samplers_at_once_match_alone(pipes) -> None:
    ours = pipes["large"][1]
    work = [(name, seed) for name in NEW for seed in (21, 22)]
    alone = {w: _image(ours, w[0], seeds=(w[1],)) for w in work}
    start, results = threading.Barrier(len(work)), {}

    def run(w) -> None:
        start.wait()
        results[w] = _image(ours, w[0], seeds=(w[1],))

    threads = [threading.Thread(target=run, args=(w,)) for w in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(float(np.abs(results[w] - alone[w]).max()) for w in work) <= 1e-6
