"""`sd35trt bench --configs e2e --memory default,low`: peak GPU memory and time of whole images per memory mode.

Random weights at real shapes (seeded), the torch-fp8 backend's models (FP8 MMDiT from a max
calibration, T5-XXL weight-only FP8, VAE channels-last; eager), run through the runtime's own
`Pipeline` with `runtime.memory.apply_memory`: text encoders through VAE decode, CFG. Prompts are
random token ids (no tokenizer at real size here); a "repeated" prompt is the warm-up's text again
(a prompt-cache hit in balanced / low), a "new" one a text not seen before (the encoders run).
Peak = torch's max allocated bytes over the image (reset before it); modes run in the order given,
on the same weights, so their ratios come from one run.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from sd35trt.bench import EXCLUDE, free, random_init, random_mmdit, step_inputs
from sd35trt.bench_e2e import _Pretokenized, prompt_ids, text_encoders
from sd35trt.runtime.config import VARIANTS, VariantConfig

GIB = 2**30


def torch_fp8_backend(config: VariantConfig, size: int, t5: bool):
    """The torch-fp8 backend over random full-size modules on the GPU (no checkpoint at real size here)."""
    from sd35trt.runtime.backends.torch_backend import TorchBackend
    from sd35trt.runtime.models.fp8 import fp8_weights_only, max_calibrate, to_fp8
    from sd35trt.runtime.models.loader import ClipGraph, T5Graph
    from sd35trt.runtime.models.mmdit import use_sigmoid_gelu
    from sd35trt.runtime.models.vae import VaeDecoder

    enc = text_encoders()
    model = random_mmdit(config, torch.bfloat16, "cuda")
    args = step_inputs(config, size, 1, "cuda", torch.bfloat16)
    with torch.no_grad():
        mmdit = to_fp8(model, max_calibrate(model, lambda m: m(*args), EXCLUDE))
    use_sigmoid_gelu(mmdit)
    with torch.device("meta"):
        vae = VaeDecoder(config.vae)
    vae = random_init(vae, "cuda", 7).to(memory_format=torch.channels_last)
    modules = {"clip_l": ClipGraph(enc["clip_l"]), "clip_g": ClipGraph(enc["clip_g"]), "transformer": mmdit,
               "vae_decoder": vae}
    if t5:
        enc["t5"].set_input_embeddings(enc["t5"].get_input_embeddings())  # one embedding, as the loader ties it
        modules["t5"] = T5Graph(fp8_weights_only(enc["t5"]))
    del enc, model
    free()
    return TorchBackend.from_modules(modules, torch.device("cuda"), torch.bfloat16)


def _cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _peaks() -> tuple[int, int]:
    """(allocated, reserved) peak bytes since the last reset; zeros off CUDA (the CPU test runs the same loop)."""
    if not _cuda():
        return 0, 0
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def _reset() -> None:
    if _cuda():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


class StagePeaks:
    """Peak allocated / reserved bytes per stage (a Residency observer): at each stage boundary the
    peak since the last one goes to the stage left and the peak is reset; `finish()` closes the
    image's last stage. Work between stages counts for the stage running before it (or the first)."""

    def __init__(self) -> None:
        self.peaks: dict[str, tuple[int, int]] = {}  # over every image so far
        self.image = (0, 0)  # over the stages of the image since `finish()`
        self.stage: str | None = None

    def __call__(self, left: str | None, entered: str) -> None:
        self._close()
        self.stage = entered

    def _close(self) -> None:
        if self.stage is not None:
            old, (alloc, reserved) = self.peaks.get(self.stage, (0, 0)), _peaks()
            self.peaks[self.stage] = (max(old[0], alloc), max(old[1], reserved))
            self.image = (max(self.image[0], alloc), max(self.image[1], reserved))
            _reset()

    def finish(self) -> tuple[int, int]:
        """Closes the image's last stage; (allocated, reserved) peak bytes over the image's stages."""
        self._close()
        image, self.image, self.stage = self.image, (0, 0), None
        return image


def _image(pipe, prompt: str, size: int, steps: int, stages: StagePeaks | None = None) -> tuple[float, int, int]:
    """(seconds, peak allocated bytes, peak reserved bytes) of one whole image (the max over its
    stages when `stages` records them: it resets the peak at each boundary)."""
    _reset()
    t0 = time.perf_counter()
    pipe(prompt, height=size, width=size, num_inference_steps=steps, output_type="np", progress=False,
         generator=torch.Generator().manual_seed(0))
    alloc, reserved = _peaks()
    seconds = time.perf_counter() - t0
    if stages is not None:
        image = stages.finish()
        alloc, reserved = max(alloc, image[0]), max(reserved, image[1])
    return seconds, alloc, reserved


def stage_budget(backend, stages: StagePeaks) -> dict[str, dict[str, float]]:
    """stage -> weights the plan puts on the device (GiB; T5 in low: its two largest neighbouring
    pieces and the rest), the measured peak allocated over the stage, and their difference
    (activations, the VAE tiles, the prompt embeddings, the allocator's rounding)."""
    out = {}
    for stage, (alloc, reserved) in stages.peaks.items():
        weights = backend.residency.weight_bytes(stage)
        out[stage] = {"weights_gib": round(weights / GIB, 3), "peak_gib": round(alloc / GIB, 3),
                      "other_gib": round((alloc - weights) / GIB, 3), "reserved_gib": round(reserved / GIB, 3),
                      "weights_bytes": weights, "peak_bytes": alloc}
    return out


def bench_memory(preset: str, size: int, steps: int, modes: list[str], t5: bool = True, repeats: int = 2,
                 out: Path | None = None) -> list[dict]:
    """`measure_modes` over the torch-fp8 backend's random full-size modules of `preset` (CUDA)."""
    check_modes(modes)
    config = VARIANTS[preset]
    backend = torch_fp8_backend(config, size, t5)
    ids = prompt_ids(config, torch.Generator(device="cuda").manual_seed(9))
    tokenizers = tuple(_Pretokenized(ids[k]) for k in ("clip_l", "clip_g", "t5"))
    return measure_modes(config, backend, tokenizers, size, steps, modes, repeats,
                         {"preset": preset, "t5": t5}, out)


def check_modes(modes: list[str]) -> None:
    from sd35trt.runtime.memory import MODES

    if modes != sorted(modes, key=MODES.index) or len(set(modes)) < len(modes) or set(modes) - set(MODES):
        raise ValueError(f"--memory {','.join(modes)}: give each mode once, in the order {','.join(MODES)} "
                         f"(a later mode starts from the host copies an earlier one made)")


def measure_modes(config: VariantConfig, backend, tokenizers: tuple, size: int, steps: int, modes: list[str],
                  repeats: int = 2, meta: dict | None = None, out: Path | None = None) -> list[dict]:
    """One row per mode: peak allocated GiB over whole images, seconds per image on a repeated and a
    new prompt (medians of `repeats`), ratios to the first mode's; with `repeats=0` the first image
    only (a new prompt: every stage runs, so its peak is the mode's). Modes that move weights also
    report each stage's weights and measured peak (`stages`). Any device (peaks are 0 off CUDA)."""
    from sd35trt.runtime.memory import MemoryBackend, MemorySettings, apply_memory
    from sd35trt.runtime.pipeline import Pipeline

    check_modes(modes)
    rows, previous, fresh = [], None, iter(range(10**6))
    for mode in modes:
        if isinstance(previous, MemoryBackend):  # the last mode's device copies go; its host masters are reused
            for h in previous.residency.handles.values():
                h.unload()
        pipe = Pipeline(config, backend, tokenizers, Path(f"random-{config.name}"))
        pipe = apply_memory(pipe, MemorySettings.check(mode))
        previous, stages = pipe.backend, None
        if isinstance(pipe.backend, MemoryBackend):
            stages = StagePeaks()
            pipe.backend.residency.observers.append(stages)
        free()
        warm = _image(pipe, "warm-up prompt", size, steps, stages)
        rep = [_image(pipe, "warm-up prompt", size, steps, stages) for _ in range(repeats)]
        new = [_image(pipe, f"new prompt {next(fresh)}", size, steps, stages) for _ in range(repeats)]
        every = [warm] + rep + new
        row = {**(meta or {}), "size": size, "steps": steps, "memory": mode, "images": len(every),
               "peak_gib": round(max(r[1] for r in every) / GIB, 3),
               "peak_reserved_gib": round(max(r[2] for r in every) / GIB, 3), "first_s": round(warm[0], 3)}
        if repeats:
            row.update(repeated_s=round(statistics.median(r[0] for r in rep), 3),
                       new_s=round(statistics.median(r[0] for r in new), 3))
        if rows and repeats:
            row["repeated_vs_first_mode"] = round(row["repeated_s"] / rows[0]["repeated_s"], 3)
            row["new_vs_first_mode"] = round(row["new_s"] / rows[0]["new_s"], 3)
        if stages is not None:
            row["stages"] = stage_budget(pipe.backend, stages)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out is not None:
            out.write_text(json.dumps(rows, indent=1))
    return rows
