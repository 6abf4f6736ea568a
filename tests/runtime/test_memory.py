"""Memory modes on the CPU: the residency the backend reports (measured from the weights' storage),
images identical across modes, the prompt cache, the micro-batcher, bad values refused before loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sd35trt.runtime import InvalidInputError, Pipeline
from sd35trt.runtime.batching import Job, MicroBatcher
from sd35trt.runtime.memory import MODES, STAGES, MemoryBackend, residency_plan

KW = dict(prompt="a lighthouse at dusk", negative_prompt="fog", height=64, width=64, num_inference_steps=3,
          guidance_scale=4.0, output_type="np", progress=False)


def _load(path: Path, memory: str, **kw) -> Pipeline:
    return Pipeline.from_pretrained(path, backend="torch", device="cpu", dtype=torch.float32, memory=memory, **kw)


@pytest.fixture(scope="module")
def pipes(tiny_medium: Path) -> dict[str, Pipeline]:
    return {m: _load(tiny_medium, m) for m in MODES}


def _run(pipe: Pipeline, seed: int = 1, **kw) -> np.ndarray:
    return pipe(**{**KW, **kw}, generator=torch.Generator().manual_seed(seed)).images


def _on_device(pipe: Pipeline) -> set[str]:
    """Components whose weights live in device copies now, read from the tensors, not the report."""
    return {c for c, h in pipe.backend.residency.handles.items() if h.resident()}


def test_low_holds_one_stage_at_a_time(pipes) -> None:
    pipe = pipes["low"]
    seen: list[set[str]] = []
    before = len(pipe.backend.residency_report())
    _run(pipe, prompt="a stage-by-stage test", callback_on_step_end=lambda p, i, t, kw: seen.append(_on_device(p)) or {})
    report = pipe.backend.residency_report()[before:]
    assert [s for s, _ in report] == ["clip_l", "clip_g", "t5", "transformer", "vae"]
    for stage, resident in report:
        assert resident == set(STAGES[stage]) & set(pipe.backend.residency.handles), (stage, resident)
    assert seen and all(s == {"transformer"} for s in seen)  # during every denoising step
    assert _on_device(pipe) == {"vae_decoder", "vae_encoder"}  # the last stage stays until the next one


def test_low_streams_t5_one_or_two_blocks_at_a_time(pipes) -> None:
    """In low, T5's embedding and blocks come to the device one at a time (the next one prefetched),
    no other stage's weights with them; measured from the tensors at each piece's start."""
    from functools import partial

    from sd35trt.runtime.models.streaming import t5_pieces

    res = pipes["low"].backend.residency
    t5 = res.handles["t5"]
    pieces = t5_pieces(pipes["low"].backend.modules["t5"])  # [embedding, block 0, block 1, ...]
    assert t5.streaming and len(t5.pieces) == len(pieces) >= 3
    seen: list[tuple[int, list[bool], frozenset[str]]] = []
    probe = lambda i, m, args: seen.append((i, [w.resident() for w in t5.pieces], res.resident()))  # noqa: E731
    hooks = [p.register_forward_pre_hook(partial(probe, i)) for i, p in enumerate(pieces)]
    try:
        _run(pipes["low"], prompt="a streamed T5 test")
    finally:
        for h in hooks:
            h.remove()
    assert [i for i, _, _ in seen] == list(range(len(pieces)))  # each piece ran once, in order
    for i, on, components in seen:
        assert {j for j, r in enumerate(on) if r} == {i, i + 1} & set(range(len(on))), (i, on)  # this + the next
        assert components == {"t5"}, (i, components)  # never two stages' weights at once
    assert t5.most_pieces == 2 and not t5.resident()  # all of T5 gone once denoising starts
    sizes = [w.nbytes for w in t5.pieces]
    assert t5.peak_bytes == t5.rest.nbytes + max(a + b for a, b in zip(sizes, sizes[1:])) < t5.nbytes
    assert res.weight_bytes("t5") == t5.peak_bytes


def test_streamed_weights_without_prefetch_hold_one_piece(pipes) -> None:
    from sd35trt.runtime.models.streaming import BlockStream

    mod = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    x = torch.randn(2, 8)  # [B, 8]
    ref = mod(x)
    handle = BlockStream(mod, list(mod), torch.device("cpu"), prefetch=False)
    handle.streaming = True
    on: list[int] = []
    for layer in mod:
        layer.register_forward_pre_hook(lambda m, a: on.append(sum(w.resident() for w in handle.pieces)))
    handle.load()
    assert torch.equal(mod(x), ref) and on == [1, 1, 1, 1] and handle.peak_bytes == handle.pieces[0].nbytes
    handle.unload()
    handle.streaming = False  # balanced: the whole module comes and goes
    handle.load()
    assert all(w.resident() for w in handle.pieces) and torch.equal(mod(x), ref) and handle.peak_bytes == handle.nbytes
    handle.unload()
    assert not handle.resident()


def test_balanced_keeps_transformer_and_vae_and_sends_text_encoders_away(pipes) -> None:
    pipe = pipes["balanced"]
    before = len(pipe.backend.residency_report())
    _run(pipe, prompt="a balanced test")
    report = dict(pipe.backend.residency_report()[before:])
    assert report["clip_l"] >= {"clip_l", "transformer", "vae_decoder"}
    assert "clip_l" not in report["clip_g"] and "clip_l" not in report["t5"]
    assert report["transformer"] == report["vae"] == {"transformer", "vae_decoder", "vae_encoder"}
    assert not pipe.backend.residency.handles["t5"].streaming  # balanced moves T5 whole
    assert _on_device(pipe) == {"transformer", "vae_decoder", "vae_encoder"}  # between requests


def test_plans() -> None:
    every = ["clip_l", "clip_g", "t5", "transformer", "vae_decoder"]
    low = residency_plan("low", every)
    assert all(len({s for s, comps in STAGES.items() if set(comps) & want}) == 1 for want in low.values())
    assert residency_plan("default", every)["clip_l"] == set(every)
    assert "t5" not in residency_plan("low", every[:2] + every[3:])  # T5 left out: no T5 stage


def test_images_identical_across_modes_and_the_cache_skips_the_encoders(pipes) -> None:
    ref = _run(pipes["default"])
    for mode in ("balanced", "low"):
        pipe = pipes[mode]
        hits = pipe.encode.hits
        first, again = _run(pipe), _run(pipe)
        assert np.array_equal(first, ref) and np.array_equal(again, ref), mode
        assert pipe.encode.hits >= hits + 1
    before = len(pipes["low"].backend.residency_report())
    _run(pipes["low"])  # cached prompt: straight to the transformer
    assert [s for s, _ in pipes["low"].backend.residency_report()[before:]] == ["transformer", "vae"]
    assert not np.array_equal(_run(pipes["low"], prompt="another prompt"), ref)


def test_image_to_image_in_low_mode_equals_default(pipes) -> None:
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    from PIL import Image

    kw = dict(image=Image.fromarray(image), strength=0.7, prompt="an image-to-image test")
    ref = _run(pipes["default"], **kw)
    before = len(pipes["low"].backend.residency_report())
    assert np.array_equal(_run(pipes["low"], **kw), ref)
    stages = [s for s, _ in pipes["low"].backend.residency_report()[before:]]
    assert stages == ["clip_l", "clip_g", "t5", "vae", "transformer", "vae"]  # encode, denoise, decode


def test_low_mode_decodes_in_tiles_as_diffusers(tiny_medium: Path, pipes) -> None:
    diffusers = pytest.importorskip("diffusers", reason="diffusers (test extra) is the reference tiled VAE")
    tiled = _load(tiny_medium, "low", vae_tile_size=32)
    untiled = _load(tiny_medium, "low", vae_tiling=False)
    kw = dict(height=80, width=112)
    a, b, ref = _run(tiled, **kw), _run(untiled, **kw), _run(pipes["default"], **kw)
    assert np.array_equal(b, ref) and not np.array_equal(a, ref)
    vae = diffusers.AutoencoderKL.from_pretrained(tiny_medium / "vae").eval()
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 4
    z = _run(tiled, **kw, output_type="latent")  # [1, 16, 10, 14]
    with torch.no_grad():
        image = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample  # [1, 3, 80, 112]
    theirs = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(a - theirs).max() <= 1e-4


def test_micro_batcher_in_low_mode_gives_the_unbatched_images(pipes) -> None:
    jobs = [Job("a red fox", seed=3, height=64, width=64, steps=3, output_type="np"),
            Job("a blue bird", negative_prompt="dark", seed=5, height=64, width=64, steps=3, output_type="np")]
    with MicroBatcher(pipes["low"], max_batch=4, window_ms=200) as batcher:
        tickets = [batcher.submit(j) for j in jobs]
        outs = [t.result(timeout=120) for t in tickets]
    assert batcher.stats().batch_sizes == {2: 1}
    for job, out in zip(jobs, outs):
        alone = pipes["default"](**job.call_kwargs(), progress=False).images
        np.testing.assert_allclose(out.images, alone, atol=1e-5)  # batch of 2 vs 1: same within fp32 reordering


@pytest.mark.parametrize("options, match", [
    (dict(memory="tiny"), "memory="), (dict(memory=3), "memory="), (dict(vae_tiling="yes"), "vae_tiling="),
    (dict(vae_tile_size=100), "vae_tile_size="), (dict(prompt_cache=-1), "prompt_cache="),
    (dict(memory="low", compile="reduce-overhead"), "reduce-overhead"),
])
def test_bad_memory_options_are_refused_before_loading(tmp_path: Path, options, match) -> None:
    with pytest.raises(InvalidInputError, match=match):
        Pipeline.from_pretrained(tmp_path / "no-such-model", **options)


def test_a_backend_without_weight_handles_is_refused(pipes) -> None:
    inner = pipes["default"].backend

    class Fixed:  # what ONNX Runtime sessions look like to the memory modes: nothing to move
        name, device = "onnxruntime", torch.device("cpu")
        clip_l = clip_g = t5 = transformer = vae_decoder = vae_encoder = inner.clip_l

    with pytest.raises(InvalidInputError, match="memory='low'"):
        MemoryBackend(Fixed(), __import__("sd35trt.runtime.memory", fromlist=["x"]).MemorySettings.check("low"),
                      pipes["default"].config)


def test_cli_memory_modes_equal_the_runtime_modes() -> None:
    from sd35trt import cli_checks

    assert cli_checks.MEMORY_MODES == MODES


def test_view_weights_release_their_base() -> None:
    """FP8Linear keeps `weight_t = w.t()`: a view whose `_base` would keep the original (device)
    storage alive after `.data` is swapped (the first H200 run measured low's peak at default's)."""
    from sd35trt.runtime.models.offload import ModuleWeights

    mod = torch.nn.Module()
    mod.register_buffer("weight_t", torch.randn(64, 32).t())
    assert mod.weight_t._base is not None
    handle = ModuleWeights(mod, torch.device("cpu"))
    assert mod.weight_t._base is None and mod.weight_t.stride() == (1, 32)  # column-major kept
    host = mod.weight_t.data_ptr()
    handle.load()
    assert handle.resident() and mod.weight_t.data_ptr() != host and mod.weight_t.stride() == (1, 32)
    handle.unload()
    assert not handle.resident() and mod.weight_t.data_ptr() == host and mod.weight_t._base is None


def test_streaming_on_an_indexed_device_loads_each_piece_once() -> None:
    """Handles made for `cpu:0` (like `cuda` vs `cuda:0` on the GPU: torch calls the devices different)
    still see their copies: a prefetched piece is used as it is, not copied again (the first H200 run
    of the GPU test found `resident()` False for every component on `cuda`)."""
    from sd35trt.runtime.models.offload import ModuleWeights
    from sd35trt.runtime.models.streaming import BlockStream

    mod = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    x = torch.randn(2, 8)  # [B, 8]
    ref = mod(x)
    handle = BlockStream(mod, list(mod), torch.device("cpu", 0))
    handle.streaming = True
    prefetched: dict[int, int] = {}
    used: dict[int, int] = {}

    def probe(i, m, a):  # runs after the handle's own pre-hook: piece i there, piece i + 1 prefetched
        used[i] = mod[i].weight.data_ptr()
        if i + 1 < len(mod):
            prefetched[i + 1] = mod[i + 1].weight.data_ptr()

    for i, layer in enumerate(mod):
        layer.register_forward_pre_hook(lambda m, a, i=i: probe(i, m, a))
    handle.load()
    assert handle.resident() and torch.equal(mod(x), ref)
    assert all(used[i] == prefetched[i] for i in prefetched) and handle.most_pieces == 2
    handle.unload()
    whole = ModuleWeights(torch.nn.Linear(4, 4), torch.device("cpu", 0))
    whole.load()
    assert whole.resident()
